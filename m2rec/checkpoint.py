"""Checkpoints: the model's state_dict with everything needed to rebuild it and to check that it is
evaluated on the data it was trained on.

The data are recorded twice over: where they were (``data.spec`` as typed, ``data.path`` resolved to
an absolute path, ``data.k_core``) and what they were (``data.fingerprint``, see
:func:`data_fingerprint`). Evaluation finds the data from the resolved path, so it works from any
working directory, and refuses data whose fingerprint differs. Checkpoints written before ``path``
was recorded still load; their ``spec`` is then used as it is.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .atomic_io import torch_save_atomic
from .data import DATA_SET_NAMES, SequenceData
from .models import MODELS, build_model
from .run_folder import CHECKPOINT

FORMAT_VERSION = 1


def data_fingerprint(data: SequenceData) -> str:
    """Hash of the processed id tables: the raw id of every item number, every user's raw id and
    item sequence (after k-core, in time order). Equal iff the model would see the same numbering and
    the same splits, whatever file, folder or encoding they came from."""
    h = hashlib.sha256(json.dumps([data.item_ids, data.user_ids, data.sequences]).encode())
    return h.hexdigest()[:16]


def data_source(spec: str, k_core: int) -> Dict[str, Any]:
    """Where the data of ``--data spec`` are: the spec as typed, and its absolute path when it names
    a file or folder (None for a data set name such as ml-100k)."""
    path = Path(spec)
    return {"spec": spec, "path": str(path.resolve()) if path.exists() else None, "k_core": k_core}


def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, model_name: str,
                    model_kwargs: Dict[str, Any], data: SequenceData, source: Dict[str, Any],
                    extra: Dict[str, Any]) -> Path:
    """``model_kwargs`` must be plain values (the text table is saved inside the state_dict and
    rebuilt from ``d_text``); ``source`` comes from :func:`data_source`. Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_kwargs": model_kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data": dict(source, name=data.name, n_users=data.n_users, n_items=data.n_items,
                     item_ids=list(data.item_ids), fingerprint=data_fingerprint(data)),
        **extra,
    }
    return torch_save_atomic(payload, path)


# What load_checkpoint and evaluation read: (key, type) at the top level and in "data".
_REQUIRED = (("model_name", str), ("model_kwargs", dict), ("state_dict", dict), ("data", dict),
             ("train_config", dict), ("epoch", int))
_REQUIRED_DATA = (("spec", str), ("k_core", int), ("n_items", int), ("item_ids", list), ("fingerprint", str))


def _check_structure(path: Path, ckpt: Any) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an m2rec checkpoint of format version {FORMAT_VERSION}")
    for where, table, required in (("", ckpt, _REQUIRED), ("data.", ckpt.get("data"), _REQUIRED_DATA)):
        for key, kind in required:
            if not isinstance(table.get(key), kind):
                raise ValueError(f"{path}: damaged m2rec checkpoint: '{where}{key}' is missing or not a "
                                 f"{kind.__name__}")
    if ckpt["model_name"] not in MODELS:
        raise ValueError(f"{path}: damaged m2rec checkpoint: unknown model {ckpt['model_name']!r}")
    if not isinstance(ckpt["train_config"].get("max_len"), int):
        raise ValueError(f"{path}: damaged m2rec checkpoint: 'train_config.max_len' is missing")


def _check_weights(path: Path, model: torch.nn.Module, state_dict: Dict[str, Any]) -> None:
    """One line naming what does not fit, instead of load_state_dict's multi-line RuntimeError."""
    want = model.state_dict()
    missing = [k for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    wrong = [k for k in want if k in state_dict and (not isinstance(state_dict[k], torch.Tensor)
                                                     or state_dict[k].shape != want[k].shape)]

    def names(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    for problem, keys in (("missing weights", missing), ("unexpected weights", unexpected),
                          ("weights of the wrong shape", wrong)):
        if keys:
            raise ValueError(f"{path}: damaged m2rec checkpoint: {problem} {names(keys)} for its "
                             f"{type(model).__name__} model")


def load_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu", backend: str = "auto"
                    ) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the model from a checkpoint; returns ``(model in eval mode, checkpoint dict)``.

    ``backend`` is the kernel backend to run with, not the one trained with: the parameters do not
    depend on it, so a model trained with Triton on a GPU evaluates on a CPU (``auto`` = torch there).
    A file that is not a complete m2rec checkpoint raises ValueError with one line saying why."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # e.g. torch's multi-line note on a foreign pickle protocol
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        # torch's own message would suggest weights_only=False, i.e. running arbitrary code from the
        # file: never offered. The exception type is enough to tell the cases apart.
        raise ValueError(f"{path}: not a readable m2rec checkpoint (truncated, damaged or not written by "
                         f"'m2rec train'; {type(e).__name__})") from None
    _check_structure(path, ckpt)
    kwargs = dict(ckpt["model_kwargs"])
    if "backend" in kwargs:
        kwargs["backend"] = backend
    d_text = kwargs.pop("d_text", None)
    if d_text is not None:  # placeholder of the right shape; the real table is in the state_dict
        kwargs["text_embeddings"] = torch.zeros(ckpt["data"]["n_items"] + 1, d_text)
    try:
        model = build_model(ckpt["model_name"], ckpt["data"]["n_items"], **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: damaged m2rec checkpoint: its model arguments are invalid ({e})") from None
    _check_weights(path, model, ckpt["state_dict"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


def training_data(ckpt: Dict[str, Any], data_arg: Optional[str]) -> Tuple[str, str]:
    """``(what to load, how to name it in messages)`` for evaluating ``ckpt``: ``--data`` when given,
    else the recorded absolute path, else (older checkpoints, data set names) the recorded spec.
    Raises ValueError, saying how to point ``--data`` at the data, when the recorded path is gone."""
    if data_arg is not None:
        return data_arg, f"--data {data_arg}"
    recorded = ckpt["data"]
    spec, path = recorded["spec"], recorded.get("path")
    hint = "pass its location with 'm2rec evaluate CHECKPOINT --data PATH'"
    if path:
        if not Path(path).exists():
            raise ValueError(f"the training data {path} (trained with --data {spec}) no longer exists there; "
                             f"{hint}")
        return path, f"the training data {path}"
    if spec not in DATA_SET_NAMES and not Path(spec).exists():
        raise ValueError(f"the checkpoint records its data as {spec!r}, relative to the folder training ran "
                         f"in, and there is no such path here; {hint}")
    return spec, f"the training data {spec!r}"


def check_same_data(ckpt: Dict[str, Any], data: SequenceData, source: str) -> None:
    """Refuse to evaluate on data that differ from the training data (other ids or sequences);
    ``source`` names where they were loaded from (see :func:`training_data`)."""
    hint = "point 'm2rec evaluate CHECKPOINT --data PATH' at the data the model was trained on"
    recorded = ckpt["data"]
    if data.item_ids != recorded["item_ids"]:
        raise ValueError(f"{source} is not the training data: its item ids differ from the checkpoint's "
                         f"({data.n_items} vs {recorded['n_items']} items); {hint}")
    if data_fingerprint(data) != recorded["fingerprint"]:
        raise ValueError(f"{source} is not the training data: same item ids, but the users' sequences "
                         f"differ (fingerprint {data_fingerprint(data)} vs {recorded['fingerprint']}); {hint}")
