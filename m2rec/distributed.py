"""Several processes, one run: torchrun's environment, the process group, and the few collectives that
training and evaluation need (DESIGN §7).

``torchrun --nproc_per_node N -m m2rec train ...`` starts N copies of the command with RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE in their environment and a rendezvous to meet at. :func:`join` turns
that into a :class:`ProcessGroup` — gloo on CPU, NCCL on CUDA with each process on ``cuda:LOCAL_RANK``
— and, without torchrun (or with one process), into a single-process group whose collectives do
nothing, so training and evaluation have one code path and a plain run is what it always was.

How a run ends when one process fails: before it exits, a process writes how it ended ("failed: what"
or "interrupted") into the rendezvous store. A process that then finds a collective broken (gloo: the
peer's connection closed) or is stopped by torchrun (SIGTERM, sent to the others once one exits with an
error) reads the store, and so reports "rank 1 of 2 failed: what" rather than a closed connection or an
interruption. Collectives time out after ``timeout_s`` (default 30 min, torch's own), so a peer that is
gone without exiting (a lost node) cannot hang the others for ever.

Sources that shaped this (read, not copied): torch.distributed.run (the environment it sets, its
OMP_NUM_THREADS=1 per worker), DistributedDataParallel's documentation (gradients averaged over the
processes, parameters broadcast from rank 0 at construction), torch.utils.data.DistributedSampler
(shuffling from the seed and the epoch; it pads the last batch with repeated examples, which m2rec
does not do: see ``m2rec.data.batching.iterate_batch_shards``).
"""
from __future__ import annotations

import inspect
import math
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

#: torch's own default for gloo; the longest legitimate wait is rank 0 encoding the item texts
#: while the others wait for the table (run ``m2rec embed-items`` once first on a large catalogue)
DEFAULT_TIMEOUT_S = 1800.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_ENDED_KEY = "m2rec/ended/{}"


class PeerFailed(RuntimeError):
    """Raised on the other processes when one process of the run failed; ``str()`` says which and why."""


def launched_ranks() -> Tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment; ``(0, 1)`` outside torchrun."""
    if not all(name in os.environ for name in _TORCHRUN_VARS):
        return 0, 1
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} in the "
                         f"environment must be integers (torchrun sets them)") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (cgroups, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_process(requested: Optional[int]) -> Optional[int]:
    """torch intra-op threads for this process: ``requested`` (``--threads``) when given; under torchrun
    the cores divided among the processes on this machine (LOCAL_WORLD_SIZE), at least 1 — torchrun
    itself sets OMP_NUM_THREADS=1, which leaves cores idle; else None (torch's own default)."""
    if requested is not None:
        return requested
    if launched_ranks()[1] > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
        return max(1, available_cores() // max(local, 1))
    return None


def describe(error: BaseException) -> str:
    """One line for an exception: its message for the errors m2rec raises on bad input, else the type
    too (a RuntimeError from deep inside torch says little without it)."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(error, (ValueError, OSError, ImportError, PeerFailed)) and first:
        return first
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class _LossOf(torch.nn.Module):
    """DDP synchronises the gradients of what its ``forward`` computed, so ``model.loss`` runs as one."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.loss(*args, **kwargs)


class ProcessGroup:
    """This process's place in the run and the collectives over all of its processes. With one process
    (``world_size == 1``) every collective returns its input."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu")):
        self.rank, self.world_size, self.device = rank, world_size, device
        self._store = None  # the rendezvous store, for how each process ended

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # -- collectives (NCCL needs the tensors on this process's GPU, gloo on the CPU) --

    def sum(self, values: Sequence[float]) -> List[float]:
        """The element-wise sum over all processes (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, values: Sequence[int]) -> List[int]:
        """Rank 0's ``values`` (integers) on every process."""
        if not self.distributed:
            return [int(v) for v in values]
        import torch.distributed as dist
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (e.g. M2Rec's frozen text table) into every process's ``module``.
        DistributedDataParallel broadcasts the parameters itself, but not the buffers in every torch
        version once it is told not to re-send them before every step (see :meth:`parallel_loss`)."""
        if not self.distributed:
            return
        import torch.distributed as dist
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def gather(self, part: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every process's 1-D ``part`` concatenated in rank order (process r holds ``sizes[r]`` items),
        on every process."""
        if not self.distributed:
            return part
        import torch.distributed as dist
        if len(sizes) != self.world_size or part.dim() != 1 or part.numel() != sizes[self.rank]:
            raise ValueError(f"{self}: gather of a part of shape {tuple(part.shape)}, expected "
                             f"({sizes[self.rank] if len(sizes) > self.rank else '?'},) of sizes {list(sizes)}")
        width = max(max(sizes), 1)
        padded = torch.zeros(width, dtype=part.dtype, device=self.device)
        padded[:part.numel()] = part.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(part.device)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    def parallel_loss(self, model: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """``model.loss`` with the gradients averaged over the processes after ``backward`` (one process:
        ``model.loss`` itself). DistributedDataParallel broadcasts rank 0's parameters here."""
        if not self.distributed:
            return model.loss
        from torch.nn.parallel import DistributedDataParallel
        options = inspect.signature(DistributedDataParallel.__init__).parameters
        # The buffers never change during training (broadcast once by broadcast_buffers): re-sending
        # them before every step would move M2Rec's whole text table each time.
        no_resend = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(_LossOf(model), device_ids=device_ids, **{no_resend: False})

    # -- how the run ended, through the rendezvous store --

    def record_end(self, how: str) -> None:
        """Leave ``how`` ("failed: what" or "interrupted") for the other processes to read."""
        if self._store is None:
            return
        try:
            self._store.set(_ENDED_KEY.format(self.rank), how)
        except Exception:  # the store's host may be gone already; the exit code still tells torchrun
            pass

    def peer_ended(self) -> Optional[Tuple[int, str]]:
        """``(rank, how)`` of another process that recorded its end (a failure before an interruption),
        else None. Does not wait."""
        if self._store is None:
            return None
        found = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            key = _ENDED_KEY.format(rank)
            try:
                if self._store.check([key]):
                    found.append((rank, self._store.get(key).decode()))
            except Exception:
                return None
        found.sort(key=lambda item: (not item[1].startswith("failed"), item[0]))
        return found[0] if found else None

    def peer_failure(self, error: BaseException) -> Optional[PeerFailed]:
        """When ``error`` (a broken collective or torchrun's SIGTERM) is the consequence of another process
        failing, the :class:`PeerFailed` that says so; else None."""
        if not isinstance(error, (KeyboardInterrupt, RuntimeError)) or isinstance(error, PeerFailed):
            return None
        ended = self.peer_ended()
        if ended is None or not ended[1].startswith("failed: "):
            return None
        rank, how = ended
        return PeerFailed(f"rank {rank} of {self.world_size} failed: {how[len('failed: '):]}")

    def peer_interrupted(self, error: BaseException) -> bool:
        """Whether ``error`` came from another process being interrupted (Ctrl-C reaches every process,
        but one may leave the collective before the others notice the signal)."""
        ended = self.peer_ended() if isinstance(error, RuntimeError) else None
        return ended is not None and ended[1] == "interrupted"


def _device_for(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: torch sees {torch.cuda.device_count()}; "
                             f"start at most that many processes per machine (--nproc_per_node)")
        return torch.device("cuda", local_rank)
    raise ValueError(f"--device {device}: under torchrun use --device cpu or --device cuda (each process "
                     f"then takes the GPU of its LOCAL_RANK)")


@contextmanager
def join(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[ProcessGroup]:
    """The process group of this run (see the module docstring); on leaving, this process's end is
    recorded for the others when it failed or was interrupted, and an error that is the consequence of
    another process failing becomes :class:`PeerFailed`. A default process group that the caller had
    already started (a script that calls ``train`` several times) is used and left as it is; one
    started here is destroyed on leaving (in the same process, a new one would then meet stale
    rendezvous keys)."""
    rank, world = launched_ranks()
    if world == 1:
        yield ProcessGroup(device=torch.device(device))
        return
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"--dist-timeout must be a finite number of seconds > 0, got {timeout_s!r}")
    import torch.distributed as dist
    target = _device_for(device, int(os.environ["LOCAL_RANK"]))
    if target.type == "cuda":
        torch.cuda.set_device(target)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                **({"device_id": target} if target.type == "cuda" else {}))
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise ValueError(f"the process group already started is rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}, but torchrun's environment says rank {rank} of {world}")
    group = ProcessGroup(rank, world, target)
    try:
        group._store = dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it the messages are only less precise
        group._store = None
    try:
        yield group
    except BaseException as error:
        consequence = group.peer_failure(error)
        if consequence is not None:
            raise consequence from None
        if group.peer_interrupted(error):  # a broken collective because another process was stopped
            group.record_end("interrupted")
            raise KeyboardInterrupt(f"interrupted (another process of the run was)") from None
        if isinstance(error, KeyboardInterrupt):
            group.record_end("interrupted")
        elif not isinstance(error, PeerFailed):
            group.record_end(f"failed: {describe(error)}")
        raise
    finally:
        if owned:
            dist.destroy_process_group()
