"""Which step of gpu-check runs a benchmark row, from the row's parameters (not its id string).

gpu-check (``bench/gpu_check.py``) runs the bench in priority order, one pytest run per step, with
``M2REC_BENCH_STEPS`` naming the step(s) to keep (``bench/conftest.py`` deselects the rest):

1. ``headline`` — the issue's comparison: M2Rec Triton, M2Rec unfused, Mamba4Rec (mamba_ssm where its
   CUDA scan is installed) and SASRec (SDPA), inference and training step, at L 200 and 2000 with
   batch 64 and 1 (training has no batch-1 rows);
2. ``ops`` — each op forward and forward+backward against its reference and ecosystem op;
3. ``inference`` and ``training`` — the rest of the grid;
4. ``other`` — any row not named above (rows added later land here rather than nowhere).
"""
from __future__ import annotations

STEPS = ("headline", "ops", "inference", "training", "other")
HEADLINE_L = (200, 2000)
HEADLINE_BATCH = (64, 1)
HEADLINE_MODELS = (("m2rec", "triton"), ("m2rec_unfused", "mamba_ssm"), ("mamba4rec", "auto"), ("sasrec", "sdpa"))


def step_of(function_name: str, params: dict) -> str:
    if function_name in ("test_op", "test_scan_long", "test_selective_scan_final"):
        return "ops"
    model = (params.get("name"), params.get("backend"))
    if model in HEADLINE_MODELS and params.get("L") in HEADLINE_L and params.get("batch") in HEADLINE_BATCH:
        return "headline"
    return {"test_inference": "inference", "test_train_step": "training"}.get(function_name, "other")


def selected_steps(raw: str) -> tuple:
    steps = tuple(s for s in raw.split(",") if s)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"M2REC_BENCH_STEPS: unknown step(s) {unknown}; expected some of {STEPS}")
    return steps
