"""Data: readers (RecBole atomic files, MovieLens, recbole's bundled ml-100k), a synthetic generator,
preprocessing into leave-one-out item sequences, and batching."""
from __future__ import annotations

from .batching import (TrainingExamples, build_training_examples, iterate_batch_shards, iterate_batches,
                       pad_histories)
from .errors import DataFormatError
from .preprocess import PAD_ID, SequenceData, build_sequences, k_core_rows
from .readers import (RawInteractions, read_atomic, read_movielens_1m, read_movielens_100k, read_raw,
                      recbole_ml100k_dir)
from .synthetic import make_synthetic

__all__ = [
    "DATA_SET_NAMES", "DataFormatError", "PAD_ID", "RawInteractions", "SequenceData", "TrainingExamples",
    "build_sequences", "build_training_examples", "iterate_batch_shards", "iterate_batches", "k_core_rows",
    "load_dataset", "make_synthetic", "pad_histories", "read_atomic", "read_movielens_100k",
    "read_movielens_1m", "read_raw", "recbole_ml100k_dir",
]


# Data sets given by name rather than by path (ml-100k: the copy inside the recbole wheel).
DATA_SET_NAMES = ("ml-100k", "synthetic")


def load_dataset(data: str, k_core: int = 5) -> SequenceData:
    """A data set by name (``ml-100k``, ``synthetic``) or path, preprocessed into sequences."""
    raw = make_synthetic() if str(data) == "synthetic" else read_raw(data)
    return build_sequences(raw, k_core=k_core)
