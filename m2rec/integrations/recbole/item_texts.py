"""Item texts of a RecBole data set, in RecBole's internal item-id order, and their embedding table.

RecBole remaps raw item tokens to internal ids 1..n-1 (0 is ``[PAD]``) in its own order
(``dataset.field2id_token[ITEM_ID_FIELD]``), which is not m2rec's order. The texts are read from the raw
``<data_path>/<dataset>.item`` file rather than from ``dataset.item_feat``, because RecBole's item
features are already processed (missing floats filled with the column mean, floats normalised,
token sequences cut to ``seq_len``, fields absent unless ``load_col`` names them); only the id mapping
is taken from RecBole. The text of a row is built by the same recipe as ``m2rec embed-items`` (title
(year). Genres: ...), restricted to ``text_fields`` when given, and embedded with the same encoder and
cache (``m2rec.text_embeddings.item_text_table``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ...data.errors import DataFormatError
from ...data.readers import _atomic_item_text, read_atomic_table
from ...text_embeddings import item_text_table


def item_file(dataset) -> Path:
    """``<data_path>/<dataset>.item``: where RecBole itself looks for the item features."""
    return Path(dataset.dataset_path) / f"{dataset.dataset_name}.item"


def read_item_texts(path, item_field: str, text_fields: Optional[Sequence[str]] = None,
                    encoding: str = "utf-8", field_separator: str = "\t") -> dict:
    """Raw item token -> text from an atomic ``.item`` file; ``text_fields`` picks and orders the
    columns (None: every column but the item id)."""
    if field_separator != "\t":
        raise ValueError(f"field_separator {field_separator!r}: the .item reader of M2Rec's RecBole "
                         f"integration reads tab-separated atomic files only")
    if text_fields is not None:
        if isinstance(text_fields, str) or not all(isinstance(f, str) and f for f in text_fields):
            raise ValueError(f"text_fields must be a list of .item column names, got {text_fields!r}")
    columns, rows = read_atomic_table(path, required=(item_field, *(text_fields or ())), encoding=encoding)
    names = [name for name, _ in columns]
    wanted = [n for n in names if n != item_field] if text_fields is None else list(text_fields)
    texts = {}
    for line, cells in rows:
        record = dict(zip(names, (c.strip() for c in cells)))
        token = record[item_field]
        if not token:
            raise DataFormatError(path, f"column {item_field!r} is empty", line)
        texts[token] = _atomic_item_text({name: record[name] for name in wanted})
    return texts


def texts_by_internal_id(dataset, raw_texts: dict) -> List[str]:
    """``texts[i]`` = the text of RecBole's internal item id i ("" for ``[PAD]`` and items without text)."""
    tokens = dataset.field2id_token[dataset.iid_field]
    return [""] + [raw_texts.get(str(token), "") for token in tokens[1:]]


def recbole_item_text_table(dataset, text_fields: Optional[Sequence[str]] = None,
                            model_dir=None, cache_dir=None, batch_size: int = 64,
                            device="cpu", progress: bool = True, log=None) -> Optional[torch.Tensor]:
    """The frozen (n_items_recbole, d_text) table, row i = internal item id i, row 0 zeros; or None when
    the data set has no ``.item`` file or no item text and ``text_fields`` was not given explicitly."""
    config = dataset.config
    path = item_file(dataset)
    if not path.is_file():
        if text_fields is not None:
            raise FileNotFoundError(f"text_fields {list(text_fields)} were given but there is no item file "
                                    f"{path}; set use_text: False to train without the semantic branch")
        if log:
            log(f"M2Rec: no item file {path}; training without the semantic branch")
        return None
    raw = read_item_texts(path, dataset.iid_field, text_fields, encoding=config["encoding"] or "utf-8",
                          field_separator=config["field_separator"] or "\t")
    texts = texts_by_internal_id(dataset, raw)
    if not any(t.strip() for t in texts):
        if text_fields is not None:
            raise ValueError(f"{path}: the columns {list(text_fields)} hold no text for any item of the "
                             f"data set; set use_text: False to train without the semantic branch")
        if log:
            log(f"M2Rec: {path} gives no item text; training without the semantic branch")
        return None
    name = f"{dataset.dataset_name}-recbole"
    table, cache, hit = item_text_table(name, texts, model_dir, cache_dir, batch_size=batch_size,
                                        device=device, progress=progress)
    if log:
        n_text = sum(1 for t in texts[1:] if t.strip())
        log(f"M2Rec: item texts of {n_text}/{len(texts) - 1} items, table {tuple(table.shape)} "
            f"{'from' if hit else 'cached in'} {os.fspath(cache)}")
    return table
