"""Training-step throughput over several processes: the scaling rows of the training benchmark.

A :class:`StepPool` starts N worker processes (spawned; gloo over 127.0.0.1) that each hold the
benchmark model, its part of one random global batch and an Adam optimiser, and take one training step
together on every command: m2rec's own step (``m2rec.training.train_step``: forward, the all-reduce of
the loss sum and target count, backward with DDP's gradient all-reduce, Adam). The parent times
``step()`` — send the command, wait for every process — so pytest-benchmark sees one global step per
call; the message round trip is tens of microseconds against a step of a tenth of a second or more.
With N = 1 the same set-up and step run in the calling process, without DDP, as every other row of the
suite is timed (and the smoke run spawns one pool, not two).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Callable, Dict, Tuple

#: seconds to wait for the workers to start (import torch, build the model) and for any one step
START_TIMEOUT_S, STEP_TIMEOUT_S = 300.0, 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_up(rank: int, world: int, spec: Dict) -> Tuple[Callable[[], object], Dict[str, str]]:
    """This process's training step on its part of the global batch (the process group, if any, is
    started), and the model's notes for the results."""
    import torch

    from m2rec.distributed import ProcessGroup
    from m2rec.training import train_step

    from .workloads import build_bench_model, random_batch

    group = ProcessGroup(rank, world, torch.device("cpu"))
    model, notes = build_bench_model(spec["name"], spec["backend"], spec["n_items"], spec["L"], torch.device("cpu"))
    seq, lengths, targets = random_batch(spec["n_items"], spec["L"], spec["batch"], torch.device("cpu"))
    mine = torch.tensor_split(torch.arange(spec["batch"]), world)[rank]  # as iterate_batch_shards splits
    part = (seq[mine], lengths[mine], targets[mine])
    loss_of = group.parallel_loss(model.train())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return lambda: train_step(loss_of, optimizer, group, *part, real=True, all_positions=True), notes


def _worker(rank: int, world: int, port: int, pipe, spec: Dict) -> None:
    import torch
    import torch.distributed as dist

    from m2rec.distributed import describe

    try:
        torch.set_num_threads(spec["threads"])
        if "lo" in [name for _, name in socket.if_nameindex()]:  # gloo on loopback, whatever the host name is
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=START_TIMEOUT_S))
        step, notes = _set_up(rank, world, spec)
        pipe.send(("ready", notes))
        while pipe.recv() == "step":
            step()
            pipe.send(("done", None))
        dist.destroy_process_group()
    except BaseException as e:  # the parent raises it with the rank
        pipe.send(("error", describe(e)))
    pipe.close()
    os._exit(0)  # skip the interpreter's teardown (torch's takes most of a second); nothing is left to flush


class StepPool:
    """``processes`` workers stepping together on one global batch of ``batch`` sequences (see the
    module docstring); use as a context manager."""

    def __init__(self, processes: int, name: str, backend: str, n_items: int, L: int, batch: int, threads: int):
        if batch < processes:
            raise ValueError(f"a global batch of {batch} cannot feed {processes} processes")
        self.processes = processes
        spec = dict(name=name, backend=backend, n_items=n_items, L=L, batch=batch, threads=threads)
        self._pipes, self._workers, self._local = [], [], None
        if processes == 1:  # in this process, at the suite's threads (bench/conftest.py)
            self._local, self.notes = _set_up(0, 1, spec)
            return
        context = mp.get_context("spawn")  # a fresh interpreter: no thread pool or gloo state inherited
        port = _free_port()
        try:
            for rank in range(processes):
                mine, theirs = context.Pipe()
                worker = context.Process(target=_worker, args=(rank, processes, port, theirs, spec), daemon=True,
                                         name=f"m2rec-bench-rank{rank}")
                worker.start()
                theirs.close()  # the worker holds its end now: if it dies, our end reads EOF at once
                self._pipes.append(mine)
                self._workers.append(worker)
            self.notes = self._collect(START_TIMEOUT_S)[0]
        except BaseException:
            self.close()
            raise

    def _collect(self, timeout: float):
        """Every worker's reply, in rank order; the first error (or silence past ``timeout``) raises —
        a worker that failed may leave the others waiting for it at a collective."""
        replies, waiting = {}, dict(enumerate(self._pipes))
        deadline = time.monotonic() + timeout
        while waiting:
            ready = wait(list(waiting.values()), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"bench workers {sorted(waiting)} of {self.processes}: no answer in {timeout:.0f} s")
            for rank in [r for r, pipe in waiting.items() if pipe in ready]:
                try:
                    kind, value = waiting.pop(rank).recv()
                except EOFError:
                    raise RuntimeError(f"bench worker rank {rank} of {self.processes} died "
                                       f"(exit code {self._workers[rank].exitcode})") from None
                if kind == "error":
                    raise RuntimeError(f"bench worker rank {rank} of {self.processes}: {value}")
                replies[rank] = value
        return [replies[r] for r in range(self.processes)]

    def step(self) -> None:
        """One training step of every process on its part of the global batch."""
        if self._local is not None:
            self._local()
            return
        for pipe in self._pipes:
            pipe.send("step")
        self._collect(STEP_TIMEOUT_S)

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send("stop")
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()
        self._pipes, self._workers = [], []

    def __enter__(self) -> "StepPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
