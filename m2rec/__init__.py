"""M2Rec and its baselines for next-item recommendation, on top of ``m2rec_kernels``.

``M2RecLayer`` is the drop-in layer (Mamba + frequency filter + semantic stream, gated); ``MambaMixer``
is a drop-in for ``mamba_ssm.Mamba`` (same arguments, caching and ``step``); ``M2Rec``,
``SASRec`` and ``Mamba4Rec`` share one interface (``forward``, ``scores``, ``loss``).
"""
from .layers.m2rec_layer import M2RecLayer
from .layers.mamba_mixer import MambaMixer
from .models import MODELS, M2Rec, Mamba4Rec, SASRec, SequentialRecommender, build_model

__all__ = ["M2RecLayer", "MambaMixer", "M2Rec", "SASRec", "Mamba4Rec", "SequentialRecommender", "MODELS", "build_model"]
