"""Fused Triton kernels for M2Rec's three hot operations, each beside its exact PyTorch reference, and a
compiled C++ selective scan for CPUs.

Public ops (each takes ``backend="auto" | "torch" | "triton" | "cpu"``, see ``_backend.py``):

* ``selective_scan`` / ``selective_state_update`` — Mamba-1 selective scan and its one-step form;
  ``selective_scan_final`` — its output at each sequence's last step only (last-position inference);
* ``fft_filter`` — learnable filtering in the FFT domain along the sequence axis; ``causal_filter`` — its
  causal form, taking the time-domain kernel itself;
* ``gated_fusion`` — softmax-gated mix of k branches + residual + LayerNorm;
* ``causal_conv1d`` — the causal depthwise conv1d (+ SiLU) in front of Mamba's scan (compiled on CPU).
"""
from .conv import causal_conv1d
from .freq_filter import causal_filter, fft_filter
from .fusion import gated_fusion
from .scan import selective_scan, selective_scan_final, selective_state_update

__all__ = ["selective_scan", "selective_scan_final", "selective_state_update", "fft_filter", "causal_filter", "gated_fusion",
           "causal_conv1d"]
