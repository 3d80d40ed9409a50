"""``M2Rec`` as a RecBole ``SequentialRecommender``: RecBole's config and batches in, ``m2rec.M2Rec`` inside.

Conventions checked against RecBole 1.2.1 (``recbole/data/dataset/sequential_dataset.py``,
``recbole/trainer/trainer.py``) and chengkai-liu/Mamba4Rec's ``mamba4rec.py``:

* ``dataset.num(ITEM_ID)`` counts ``[PAD]``: RecBole's ``n_items`` = m2rec's ``n_items + 1``, and internal
  id 0 is padding in both, so ids pass through unchanged.
* RecBole's ``ITEM_SEQ`` rows are left-aligned and zero-padded on the right to ``MAX_ITEM_LIST_LENGTH``
  (``new_dict[list_field][i][:length] = ...``) with ``ITEM_SEQ_LEN`` >= 1: exactly m2rec's right-padded
  layout, so they go to the model as they are (and are checked by it).
* ``full_sort_predict`` returns (batch, n_items + 1) scores with column 0 = padding, as RecBole's
  ``_full_sort_batch_eval`` expects (it views scores as (-1, dataset.item_num) and sets column 0 to
  -inf itself; ours is -inf already). For sequential models RecBole masks no history items.
* Training follows RecBole: one target per (augmented) row, predicted from the last position.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
import yaml
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss

from ...models import M2Rec as M2RecModel
from .item_texts import recbole_item_text_table

DEFAULT_CONFIG_FILE = str(Path(__file__).with_name("m2rec.yaml"))
LOSS_TYPES = ("CE", "BPR")


def default_options() -> Dict[str, Any]:
    """The model keys of ``DEFAULT_CONFIG_FILE`` (used for keys a RecBole config leaves unset)."""
    with open(DEFAULT_CONFIG_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


class M2Rec(SequentialRecommender):
    """M2Rec for RecBole's ``Config`` / ``create_dataset`` / ``data_preparation`` / ``Trainer``.

    Config keys (defaults in ``DEFAULT_CONFIG_FILE``): hidden_size, n_layers, dropout_prob, d_state,
    d_conv, expand, filter_mode, use_frequency, backend, loss_type (CE | BPR), use_text, text_fields,
    text_model_dir, text_cache_dir, text_batch_size; the sequence length is MAX_ITEM_LIST_LENGTH.
    The wrapped ``m2rec.M2Rec`` is ``self.m2rec``.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        defaults = default_options()

        def option(key):
            value = config[key]
            return defaults[key] if value is None else value

        self.loss_type = config["loss_type"]
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"M2Rec: loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        text_table = None
        if option("use_text"):
            text_table = recbole_item_text_table(
                dataset, text_fields=config["text_fields"], model_dir=config["text_model_dir"],
                cache_dir=config["text_cache_dir"], batch_size=option("text_batch_size"),
                device=self.device, progress=bool(config["show_progress"]), log=self.logger.info)
        # RecBole counts [PAD] in n_items; m2rec's n_items is the number of real items.
        self.m2rec = M2RecModel(
            n_items=self.n_items - 1, d_model=option("hidden_size"), n_layers=option("n_layers"),
            max_len=self.max_seq_length, text_embeddings=text_table, d_state=option("d_state"),
            d_conv=option("d_conv"), expand=option("expand"), filter=option("filter_mode"),
            dropout=option("dropout_prob"), use_frequency=bool(option("use_frequency")),
            backend=option("backend"))
        if self.loss_type == "BPR":
            self.bpr_loss = BPRLoss()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """(batch, d) hidden state at each sequence's last item."""
        return self.m2rec.gather_last(self.m2rec(item_seq, item_seq_len), item_seq_len)

    def calculate_loss(self, interaction) -> torch.Tensor:
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "CE":
            # Softmax over the real items only (m2rec's loss leaves the padding class out; RecBole's
            # SASRec keeps it as a class with the constant logit 0).
            return self.m2rec.loss(item_seq, item_seq_len, pos_items, all_positions=False)
        seq_output = self.forward(item_seq, item_seq_len)
        embedding = self.m2rec.item_embedding
        pos_score = (seq_output * embedding(pos_items)).sum(-1)
        neg_score = (seq_output * embedding(interaction[self.NEG_ITEM_ID])).sum(-1)
        return self.bpr_loss(pos_score, neg_score)

    def predict(self, interaction) -> torch.Tensor:
        """(batch,) score of ``interaction[ITEM_ID]`` after each sequence."""
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (seq_output * self.m2rec.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        """(batch, n_items) scores over RecBole's whole item-id space; column 0 ([PAD]) is -inf."""
        return self.m2rec.scores(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
