"""Finding and activating a carried mamba_ssm CUDA scan build (the archive ``bench/build_mamba_scan.py``
writes), so that the "mamba_ssm" rows run on a GPU machine that has no mamba_ssm of its own.

Where it looks: ``M2REC_MAMBA_BUILD`` (the archive, or a directory holding it), else ``.mamba-build/``
in the repository root (git-ignored; name it in the device run's ``carry``). The archive is used only
when its BUILD-INFO matches this machine: the same torch release (the library uses libtorch's C++ ABI)
and, with a GPU, the device's compute capability. It is unpacked into a directory whose path goes first
on ``sys.path`` and ``PYTHONPATH``; ``import mamba_ssm`` then finds its own Python package and our
``selective_scan_cuda`` module (m2rec.mamba_ssm_compat reports "cuda").
"""
from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Dict, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".mamba-build"
PATTERN = "mamba-scan-sm*-torch*.tar.gz"


def find_archive(explicit: Optional[str] = None) -> Tuple[Optional[Path], str]:
    """(archive, where it was looked for)."""
    where = explicit or os.environ.get("M2REC_MAMBA_BUILD") or str(DEFAULT_DIR)
    path = Path(where)
    if path.is_file():
        return path, where
    if path.is_dir():
        found = sorted(path.glob(PATTERN), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1], where
    return None, where


def read_build_info(archive: Path) -> Dict:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("BUILD-INFO.json")
        if member is None:
            raise ValueError(f"{archive}: no BUILD-INFO.json inside")
        return json.loads(member.read())


def mismatch(info: Dict, torch_version: str, capability: Optional[Tuple[int, int]]) -> Optional[str]:
    """Why the build cannot run with this torch / device, or None."""
    built, here = str(info.get("torch", "")).split("+")[0], torch_version.split("+")[0]
    if built != here:
        return f"it was built against torch {info.get('torch')}, this machine has torch {torch_version}"
    if capability is not None:
        arch = f"sm_{capability[0]}{capability[1]}"
        if info.get("arch") != arch:
            return f"it was built for {info.get('arch')}, this GPU is {arch}"
    return None


def activate(dest: Path, explicit: Optional[str] = None) -> Dict[str, object]:
    """Unpack a matching carried build into ``dest`` and put it first on the import path (this process
    and, through PYTHONPATH, its children). Returns a status dict for the run's summary:
    ``active`` (bool), ``reason`` (why not), ``archive``, ``build_info``."""
    import torch

    archive, where = find_archive(explicit)
    if archive is None:
        return {"active": False, "reason": f"no carried mamba_ssm build ({PATTERN}) in {where}; build one with "
                                           "'python3 tasks.py build-mamba-scan' (README, gpu-check)"}
    status: Dict[str, object] = {"archive": str(archive)}
    try:
        info = read_build_info(archive)
    except (OSError, ValueError, tarfile.TarError, json.JSONDecodeError) as exc:
        return dict(status, active=False, reason=f"unreadable build archive {archive.name}: {exc}")
    status["build_info"] = info
    capability = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    why = mismatch(info, torch.__version__, capability)
    if why is not None:
        return dict(status, active=False, reason=f"the carried mamba_ssm build does not fit: {why}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    sys.path.insert(0, str(dest))
    os.environ["PYTHONPATH"] = str(dest) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return dict(status, active=True, reason="", unpacked=str(dest))
