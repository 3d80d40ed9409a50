"""Training and evaluation on several processes (``m2rec.distributed``): two processes on this machine,
gloo over loopback only, started by torchrun as a subprocess, on a tiny synthetic data set.

The end-to-end tests compare against the single-process path run in this process: after one epoch,
2 processes × batch b hold the weights of 1 process × batch 2b (float64, so that summing the same
numbers in another order is the only difference and the tolerance can be tight), and the sharded
evaluation gives exactly the single-process metrics. The unit tests check the sharding itself.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import m2rec.checkpoint
import m2rec.training
from _tolerance import assert_close
from m2rec.checkpoint import load_checkpoint
from m2rec.cli import build_parser, main
from m2rec.data import (build_sequences, build_training_examples, iterate_batch_shards, iterate_batches,
                        load_dataset, make_synthetic)
from m2rec.distributed import ProcessGroup, threads_per_process
from m2rec.evaluation import evaluate, rank_targets, user_blocks
from m2rec.models import build_model
from m2rec.run_folder import RUN_FILES
from m2rec.training import TrainConfig, train

from test_training import write_atomic

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_distributed_worker.py"
MAX_LEN, BATCH, EVAL_BATCH = 6, 3, 9  # 67 examples: 11 global batches of 6, then one of 1 (see below)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The data (40 users) and a frozen text table for M2Rec's semantic branch."""
    root = tmp_path_factory.mktemp("distributed")
    raw = make_synthetic(n_users=40, n_items=40, n_categories=4, min_length=8, max_length=14, seed=5)
    data_dir = write_atomic(root / "tiny", raw)
    n_items = load_dataset(str(data_dir)).n_items
    table = torch.randn(n_items + 1, 12, generator=torch.Generator().manual_seed(0))
    table[0] = 0
    torch.save(table, root / "text.pt")
    return data_dir, root / "text.pt"


def train_argv(data_dir: Path, text: Path, out: Path, batch: int, epochs: int = 1):
    return ["train", "--model", "m2rec", "--data", str(data_dir), "--text-embeddings", str(text), "--out", str(out),
            "--max-len", str(MAX_LEN), "--batch-size", str(batch), "--epochs", str(epochs), "--d-model", "16",
            "--n-layers", "1", "--dropout", "0", "--eval-batch-size", str(EVAL_BATCH), "--threads", "1",
            "--no-progress", "--seed", "11", "--dist-timeout", "120"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> dict:
    """GLOO_SOCKET_IFNAME for the loopback interface: gloo would otherwise bind to whatever address the
    host name resolves to, which on some machines is a network card."""
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return {"GLOO_SOCKET_IFNAME": "lo"} if "lo" in names else {}


def torchrun(options: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """tests/_distributed_worker.py in 2 processes, rendezvous on 127.0.0.1 (a port free a moment ago:
    tried again once should another process take it in between), gloo on the loopback interface."""
    env = dict(os.environ, M2REC_TEST_WORKER=json.dumps(options), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **loopback_interface())
    for _ in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if "address already in use" not in done.stderr.lower():
            return done
    return done


@pytest.fixture
def float64_models(monkeypatch):
    """Every model that training and checkpoint loading build, in float64 (as the worker's float64)."""
    for module in (m2rec.training, m2rec.checkpoint):
        monkeypatch.setattr(module, "build_model", lambda *a, **k: build_model(*a, **k).double())


def _m2rec_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("m2rec ")]


def test_two_processes_train_and_evaluate_as_one_with_the_global_batch(tiny, tmp_path, float64_models):
    data_dir, text = tiny
    n_examples = len(build_training_examples(load_dataset(str(data_dir)).train_sequences(), MAX_LEN, True))
    assert n_examples % (2 * BATCH) == 1, "the last global batch must be a single example, so that rank 1 " \
                                          "steps on a stand-in with weight zero"
    out = tmp_path / "ddp"
    done = torchrun({"float64": True, "commands": [
        train_argv(data_dir, text, out, BATCH),
        ["evaluate", str(out), "--batch-size", str(EVAL_BATCH), "--threads", "1", "--output",
         str(tmp_path / "ddp-test.json")]]})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch   1 ") == 1 and done.stdout.count('"metrics"') == 1  # rank 0 alone speaks
    assert "2 processes (gloo): 3 sequences per process and step (6 in all)" in done.stdout
    # rank 0 alone wrote (the worker makes any write by rank 1 fail the run), and nothing half-written
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)

    reference = train(TrainConfig(**{**_config(data_dir, text, tmp_path / "one"), "batch_size": 2 * BATCH}),
                      log=lambda msg: None)
    ddp_model, ddp_ckpt = load_checkpoint(out)
    one_model, _ = load_checkpoint(reference.checkpoint)
    torch.manual_seed(11)  # the initial weights of both runs (training seeds with --seed before building)
    initial = build_model("m2rec", ddp_model.n_items, d_model=16, n_layers=1, max_len=MAX_LEN, dropout=0.0,
                          text_embeddings=torch.load(text)).double()
    moved = 0.0
    for (name, got), want, before in zip(ddp_model.state_dict().items(), one_model.state_dict().values(),
                                         initial.state_dict().values()):
        assert got.dtype == torch.float64, name
        assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)  # measured: ~1e-16 relative
        moved = max(moved, float((want - before).abs().max()))
    assert moved > 1e-3  # the epoch did change the weights (so the comparison measures the training)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["stopped"] == "max_epochs"
    log = json.loads((out / "train_log.jsonl").read_text())
    assert log["loss"] == pytest.approx(reference.history[0]["loss"], rel=1e-12)

    # Sharded evaluation = single-process evaluation, exactly: during training (validation, in the
    # log) and by 'm2rec evaluate' (test split; rank 0's JSON).
    data = load_dataset(str(data_dir))
    single_valid = evaluate(ddp_model, data, "valid", MAX_LEN, batch_size=EVAL_BATCH)
    assert log["valid"] == {k: v for k, v in single_valid.items() if k != "n_users"}
    sharded = json.loads((tmp_path / "ddp-test.json").read_text())
    assert sharded["processes"] == 2
    assert main(["evaluate", str(out), "--batch-size", str(EVAL_BATCH), "--threads", "1", "--output",
                 str(tmp_path / "one-test.json")]) == 0
    single = json.loads((tmp_path / "one-test.json").read_text())
    assert sharded["metrics"] == single["metrics"] and sharded["standard_errors"] == single["standard_errors"]
    assert sharded["metrics"]["n_users"] == 40 and ddp_ckpt["epoch"] == 1


def _config(data_dir, text, out) -> dict:
    return dict(model="m2rec", data=str(data_dir), text_embeddings=str(text), out_dir=str(out), max_len=MAX_LEN,
                batch_size=BATCH, epochs=1, d_model=16, n_layers=1, dropout=0.0, eval_batch_size=EVAL_BATCH,
                threads=1, progress=False, seed=11)


def test_a_failing_process_ends_the_run_with_one_line_naming_it(tiny, tmp_path):
    data_dir, text = tiny
    out = tmp_path / "ddp"
    # rank 1 fails at its 3rd step of epoch 2 (an epoch is 12 steps), after epoch 1's checkpoint
    done = torchrun({"commands": [train_argv(data_dir, text, out, BATCH, epochs=5)],
                     "fail": {"rank": 1, "step": 15, "message": "injected fault"}})
    assert done.returncode != 0
    lines = _m2rec_lines(done.stderr)
    assert "m2rec train: error: rank 1 of 2: RuntimeError: injected fault" in lines, done.stderr
    # rank 0 stops too, says which process failed and what, and what the run kept
    assert (f"m2rec train: error: rank 1 of 2 failed: RuntimeError: injected fault; the best checkpoint is "
            f"{out / 'checkpoint.pt'} (epoch 1)") in lines, done.stderr
    assert len(lines) == 2, done.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped"] == "failed" and summary["best_epoch"] == 1 and summary["epochs_run"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # no temporary file left behind
    assert load_checkpoint(out)[1]["epoch"] == 1


def _readme_torchrun_lines():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return [shlex.split(line.strip()) for line in readme.splitlines() if line.startswith("    torchrun ")]


@pytest.mark.parametrize("argv", _readme_torchrun_lines(), ids=lambda argv: " ".join(argv[-8:-5]))
def test_readme_torchrun_commands_parse(argv):
    """torchrun's own parser takes the launcher's part, m2rec's the rest (with -m m2rec)."""
    from torch.distributed.run import parse_args
    launcher = parse_args(argv[1:])
    assert launcher.module and launcher.training_script == "m2rec"
    args = build_parser().parse_args(launcher.training_script_args)
    assert args.command in ("train", "evaluate")


def test_the_readme_shows_one_and_several_machines():
    lines = _readme_torchrun_lines()
    assert len(lines) >= 3 and any("--rdzv_endpoint" in line for line in lines)


def test_bad_dist_timeout_is_one_line(capsys, tmp_path):
    for argv in (["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--dist-timeout", "0"],
                 ["evaluate", str(tmp_path), "--dist-timeout", "nan"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--dist-timeout must be a finite number of seconds > 0" in err, err


# -- the sharding, without processes --

@pytest.mark.parametrize("n,batch,world", [(67, 3, 2), (10, 4, 3), (5, 2, 4), (12, 3, 1)])
def test_batch_shards_split_the_single_process_batches(n, batch, world):
    """The parts of each global batch, over the ranks, are the batch one process with batch × world
    would take (same order, nothing dropped or repeated); an empty part gets a stand-in marked unreal."""
    data = build_sequences(make_synthetic(n_users=n, n_items=30, n_categories=3, min_length=4, max_length=4,
                                          seed=1), k_core=1)
    examples = build_training_examples(data.train_sequences(), 8, True)
    assert len(examples) == n
    single = list(iterate_batches(examples, batch * world, generator=torch.Generator().manual_seed(3)))
    parts = [list(iterate_batch_shards(examples, batch, r, world, generator=torch.Generator().manual_seed(3)))
             for r in range(world)]
    assert all(len(p) == len(single) for p in parts)
    for step, (inputs, lengths, targets) in enumerate(single):
        real = [parts[r][step] for r in range(world) if parts[r][step][3]]
        sizes = [len(p[1]) for p in real]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(lengths)
        assert torch.equal(torch.cat([p[1] for p in real]), lengths)
        width = inputs.shape[1]
        glued = torch.cat([torch.nn.functional.pad(p[0], (0, width - p[0].shape[1])) for p in real])
        assert torch.equal(glued, inputs)
        for r in range(world):
            if not parts[r][step][3]:  # stand-in: the global batch's first example
                assert len(lengths) < world and torch.equal(parts[r][step][1], lengths[:1])


def test_evaluation_blocks_are_whole_batches_covering_every_user():
    assert user_blocks(40, 9, 2) == [(0, 18), (18, 40)]
    assert user_blocks(10, 4, 4) == [(0, 0), (0, 4), (4, 8), (8, 10)]
    for n, b, w in ((40, 9, 2), (7, 3, 5), (100, 7, 3)):
        blocks = user_blocks(n, b, w)
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(hi == lo2 for (_, hi), (lo2, _) in zip(blocks, blocks[1:]))
        assert all(lo % b == 0 for lo, _ in blocks)


class _OnePartOf(ProcessGroup):
    """Rank ``rank``'s view, with a gather that returns only its own part: the blocks, one by one."""

    def gather(self, part, sizes):
        assert len(part) == sizes[self.rank]
        return part


def test_the_ranks_computed_in_blocks_are_the_single_process_ranks():
    data = build_sequences(make_synthetic(n_users=25, n_items=30, n_categories=3, min_length=6, max_length=12,
                                          seed=2), k_core=1)
    model = build_model("sasrec", data.n_items, max_len=8).eval()
    single = rank_targets(model, data, "test", 8, batch_size=4)
    blocks = [rank_targets(model, data, "test", 8, batch_size=4, group=_OnePartOf(r, 3)) for r in range(3)]
    assert [len(b) for b in blocks] == [8, 8, 9]
    assert torch.equal(torch.cat(blocks), single)


def test_threads_are_the_cores_shared_among_the_processes_of_a_machine(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert threads_per_process(None) is None and threads_per_process(3) == 3  # one process: as before
    monkeypatch.setattr("m2rec.distributed.available_cores", lambda: 16)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    assert threads_per_process(None) == 4 and threads_per_process(2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert threads_per_process(None) == 1


def test_one_process_collectives_return_their_input():
    group = ProcessGroup()
    assert not group.distributed and group.is_main
    assert group.sum([1.5, 2]) == [1.5, 2.0] and group.broadcast([True, 7]) == [1, 7]
    part = torch.arange(4)
    assert group.gather(part, [4]) is part
    model = build_model("sasrec", 10, max_len=4)
    assert group.parallel_loss(model) == model.loss
    assert group.peer_failure(RuntimeError("x")) is None
