"""The recommenders (one interface, see ``base.SequentialRecommender``) and a registry by name."""
from .base import SequentialRecommender
from .m2rec import M2Rec
from .mamba4rec import Mamba4Rec
from .sasrec import SASRec

MODELS = {"m2rec": M2Rec, "sasrec": SASRec, "mamba4rec": Mamba4Rec}


def build_model(name: str, n_items: int, **kwargs) -> SequentialRecommender:
    """Instantiate the model registered as ``name`` (see ``MODELS``) for ``n_items`` items."""
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](n_items, **kwargs)


__all__ = ["MODELS", "build_model", "SequentialRecommender", "M2Rec", "SASRec", "Mamba4Rec"]
