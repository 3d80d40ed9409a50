"""Run by tests/test_distributed.py in each process of a torchrun launch: m2rec's command line, after
setting up what the test asks for in M2REC_TEST_WORKER (JSON):

* ``float64``: every model that training and checkpoint loading build is converted to float64, so two
  runs that add the same numbers in another order agree to ~1e-15 and the comparison can be tight;
* ``commands``: the argument lists to run, one after the other, each through ``m2rec.cli.main``; with
  more than one, the worker starts the process group itself (gloo) so that they all use it, as a
  script calling ``train`` and then evaluating would;
* ``fail``: ``{"rank": r, "step": k, "message": m}`` — rank r's k-th optimiser step raises
  RuntimeError(m), a stand-in for any failure inside one process.

Every process other than rank 0 refuses to write a file through ``m2rec.atomic_io`` (which every file
of a run folder goes through), so a write by any other rank fails the run.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed


def main() -> int:
    options = json.loads(os.environ["M2REC_TEST_WORKER"])
    rank = int(os.environ["RANK"])
    if options.get("float64"):
        import m2rec.checkpoint
        import m2rec.training
        from m2rec.models import build_model

        for module in (m2rec.training, m2rec.checkpoint):
            module.build_model = lambda *args, **kwargs: build_model(*args, **kwargs).double()
    if rank != 0:
        import m2rec.atomic_io

        def refuse(path, *args, **kwargs):
            raise AssertionError(f"rank {rank} wrote {path}; only rank 0 may")

        m2rec.atomic_io._replace_atomically = refuse
    fail = options.get("fail")
    if fail and fail["rank"] == rank:
        original, calls = torch.optim.Adam.step, []

        def step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == fail["step"]:
                raise RuntimeError(fail["message"])
            return original(self, *args, **kwargs)

        torch.optim.Adam.step = step
    from m2rec.cli import main as m2rec_main
    if len(options["commands"]) > 1:
        torch.distributed.init_process_group("gloo")
    try:
        for argv in options["commands"]:
            code = m2rec_main(argv)
            if code:
                return code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
