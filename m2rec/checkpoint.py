"""Checkpoints: the model's state_dict with everything needed to rebuild it and to check that it is
evaluated on the data it was trained on (the data spec and the item-id mapping)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch

from .data import SequenceData
from .models import build_model

FORMAT_VERSION = 1


def data_fingerprint(data: SequenceData) -> str:
    """Hash of the item mapping and every user's sequence: equal iff the splits are identical."""
    h = hashlib.sha256(json.dumps([data.item_ids, data.user_ids, data.sequences]).encode())
    return h.hexdigest()[:16]


def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, model_name: str,
                    model_kwargs: Dict[str, Any], data: SequenceData, data_spec: Dict[str, Any],
                    extra: Dict[str, Any]) -> Path:
    """``model_kwargs`` must be plain values (the text table is saved inside the state_dict and
    rebuilt from ``d_text``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_kwargs": model_kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data": dict(data_spec, name=data.name, n_users=data.n_users, n_items=data.n_items,
                     item_ids=list(data.item_ids), fingerprint=data_fingerprint(data)),
        **extra,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu", backend: str = "auto"
                    ) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the model from a checkpoint; returns ``(model in eval mode, checkpoint dict)``.

    ``backend`` is the kernel backend to run with, not the one trained with: the parameters do not
    depend on it, so a model trained with Triton on a GPU evaluates on a CPU (``auto`` = torch there)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable m2rec checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an m2rec checkpoint of format version {FORMAT_VERSION}")
    kwargs = dict(ckpt["model_kwargs"])
    if "backend" in kwargs:
        kwargs["backend"] = backend
    d_text = kwargs.pop("d_text", None)
    if d_text is not None:  # placeholder of the right shape; the real table is in the state_dict
        kwargs["text_embeddings"] = torch.zeros(ckpt["data"]["n_items"] + 1, d_text)
    model = build_model(ckpt["model_name"], ckpt["data"]["n_items"], **kwargs)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


def check_same_data(ckpt: Dict[str, Any], data: SequenceData, source: str) -> None:
    """Refuse to evaluate on data that differs from the training data (other ids or sequences)."""
    if data.item_ids != ckpt["data"]["item_ids"]:
        raise ValueError(f"{source}: the data set's item ids differ from the checkpoint's "
                         f"({data.n_items} vs {ckpt['data']['n_items']} items): not the training data")
    if data_fingerprint(data) != ckpt["data"]["fingerprint"]:
        raise ValueError(f"{source}: the data set's sequences differ from the training data "
                         f"(fingerprint {data_fingerprint(data)} vs {ckpt['data']['fingerprint']})")
