"""Benchmark suite: model inference, op and training-step timings, memory probes and plots.

Run everything (timings, memory probes, tidy results, plots) with ``python -m bench.run_suite [--out
DIR]``; the timings alone with ``pytest bench/ --benchmark-only``; redraw the plots from result files with
``python -m bench.plots [--in DIR]``.

Output layout: every file the suite writes is named ``bench-<machine>-*`` where ``<machine>`` is
``cpu`` (no CUDA device) or ``gpu`` (CUDA), e.g. ``reports/bench-cpu-results.csv`` and
``reports/bench-gpu-latency.png``. A GPU run therefore never overwrites the CPU results that sit in the
same directory, and both can be committed side by side in ``reports/``.

Modes (``bench/grids.py``): ``gpu`` and ``cpu`` grids for real runs; ``M2REC_BENCH_SMOKE=1`` runs every
bench file once on tiny shapes (used by the test command with ``--benchmark-disable``) so the suite
cannot rot. Triton kernels are never timed under the interpreter: on a CPU-only machine their rows are
recorded with status "not run" and the reason.
"""
