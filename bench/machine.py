"""Where and when a benchmark ran: stored inside every result file and printed in every plot caption."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from typing import Dict

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # reported, not fatal: the suite runs without e.g. mamba_ssm
        return f"not importable ({type(exc).__name__})"


def machine_info() -> Dict[str, object]:
    """CPU model, core count, GPU name, library versions, UTC time."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_default_threads": torch.get_num_threads(),  # the timed threads: timing_threads
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "mamba_ssm": _version("mamba_ssm") if _mamba_importable() else "not importable",
        "platform": platform.platform(),
        # other work on the machine slows every row alike; the load average says how busy it was
        "load_average_1m_5m_15m": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "utc_time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _mamba_importable() -> bool:
    from m2rec.mamba_ssm_compat import import_mamba_ssm

    return import_mamba_ssm()[0] is not None


def short_label(info: Dict[str, object]) -> str:
    """One line for plot captions: the accelerator (or CPU model and cores), torch version, date."""
    if info.get("gpu"):
        where = f"{info['gpu']} (CUDA {info.get('cuda')})"
    else:
        cpu = re.sub(r"\s+", " ", str(info.get("cpu_model", "CPU")))
        threads = info.get("timing_threads")
        used = f" (timed on {threads} thread{'s' if threads != 1 else ''})" if threads else ""
        where = f"{cpu}, {info.get('cpu_cores')} cores{used}, no GPU"
    date = str(info.get("utc_time", ""))[:16].replace("T", " ")
    return f"{where} - torch {info.get('torch')}, triton {info.get('triton')} - {date} UTC"
