"""M2Rec inside RecBole 1.2.x: ``M2Rec`` is a RecBole ``SequentialRecommender`` (see ``model.py``).

    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from m2rec.integrations.recbole import M2Rec, m2rec_config, load_trainer_checkpoint

    config = m2rec_config(dataset="ml-100k", config_dict={"epochs": 20})  # = Config(model=M2Rec, ...)
    ...                                                                 # the rest as in pipeline.run()

or ``python -m m2rec.integrations.recbole --dataset=ml-100k --epochs=20``.

Needs RecBole 1.2.x with its runtime dependencies: ``pip install 'm2rec[recbole]'`` then
``pip install --no-deps recbole==1.2.1`` (RecBole's own requirements pull ray, plotly, thop, ... that
this path never imports). RecBole 1.2.1 needs NumPy < 2: its ``Config`` aliases ``np.float_``, which
NumPy 2 removed; the extra pins it.
"""
from __future__ import annotations

import numpy as _np

if int(_np.__version__.split(".")[0]) >= 2:
    raise ImportError(
        f"m2rec.integrations.recbole: RecBole 1.2.1 needs NumPy < 2 (its Config uses np.float_, removed in "
        f"NumPy 2), but NumPy {_np.__version__} is installed; pip install 'm2rec[recbole]' installs a "
        f"compatible set (see the README, 'M2Rec in RecBole')")
try:  # everything the integration uses, so a missing runtime dependency is named here
    import recbole.config  # noqa: F401
    import recbole.data  # noqa: F401
    import recbole.model.abstract_recommender  # noqa: F401
    import recbole.trainer  # noqa: F401
except ImportError as e:
    raise ImportError(
        f"m2rec.integrations.recbole needs RecBole 1.2.x and its runtime dependencies ({e}): "
        f"pip install 'm2rec[recbole]' && pip install --no-deps recbole==1.2.1") from e

from .item_texts import read_item_texts, recbole_item_text_table, texts_by_internal_id
from .model import DEFAULT_CONFIG_FILE, M2Rec, default_options
from .pipeline import load_trainer_checkpoint, m2rec_config, run

__all__ = ["M2Rec", "DEFAULT_CONFIG_FILE", "default_options", "m2rec_config", "load_trainer_checkpoint",
           "run", "read_item_texts", "recbole_item_text_table", "texts_by_internal_id"]
