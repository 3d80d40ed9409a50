"""Building blocks of the models: the Mamba mixer, the frequency filter, the FFN and the M2Rec layer."""
from .feed_forward import LAYER_NORM_EPS, FeedForward
from .frequency_filter import FILTER_MODES, FrequencyFilter
from .m2rec_layer import M2RecLayer
from .mamba_mixer import MambaMixer

__all__ = ["FeedForward", "FrequencyFilter", "M2RecLayer", "MambaMixer", "FILTER_MODES", "LAYER_NORM_EPS"]
