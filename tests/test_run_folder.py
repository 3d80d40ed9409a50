"""No run is lost and no folder describes two runs: atomic writes, refusal of a non-empty --out,
--overwrite, and what a run that diverges keeps."""
from __future__ import annotations

import json
import os

import pytest
import torch

import m2rec.training
from m2rec.atomic_io import torch_save_atomic, write_text_atomic
from m2rec.checkpoint import load_checkpoint
from m2rec.models import SASRec
from m2rec.training import TrainConfig, TrainingDiverged, train

from test_cli import assert_one_line, run_cli, tiny_data  # noqa: F401 (fixture)


def test_atomic_writes_leave_the_old_file_when_they_fail(tmp_path):
    path = tmp_path / "file.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(Exception):
        torch_save_atomic({"f": lambda: 0}, path)  # a lambda cannot be pickled: fails mid-write
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["file.json"]  # the temporary file is gone too
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["file.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it


def _train_argv(data, out, *extra):
    return ["train", "--model", "sasrec", "--data", data, "--epochs", "1", "--max-len", "20", "--out", out,
            "--threads", "1", "--no-progress", *extra]


def test_a_second_run_into_the_same_folder_is_refused_unless_overwrite(tmp_path, tiny_data, capsys):
    out = tmp_path / "run"
    assert run_cli(_train_argv(tiny_data, out), capsys)[0] == 0
    first = (out / "checkpoint.pt").read_bytes()
    rc, err = run_cli(_train_argv(tiny_data, out, "--seed", "1"), capsys)
    assert rc == 2
    assert_one_line(err, f"--out {out}: the folder is not empty", "--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == first  # the first run is untouched

    (out / "notes.txt").write_text("mine")
    assert run_cli(_train_argv(tiny_data, out, "--seed", "1", "--overwrite"), capsys)[0] == 0
    assert (out / "checkpoint.pt").read_bytes() != first
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["config"]["seed"] == 1 and summary["stopped"] == "max_epochs"


def test_overwrite_removes_the_earlier_run_before_training(tmp_path, tiny_data, capsys):
    """A replacing run that diverges in its first epoch must not leave the earlier checkpoint beside
    its own log and summary."""
    out = tmp_path / "run"
    assert run_cli(_train_argv(tiny_data, out), capsys)[0] == 0
    rc, err = run_cli(_train_argv(tiny_data, out, "--overwrite", "--lr", "1e30", "--model", "mamba4rec"), capsys)
    assert rc == 2
    assert_one_line(err, "epoch 1:", "diverged", "no checkpoint was written")
    assert sorted(os.listdir(out)) == ["train_log.jsonl", "train_summary.json"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped"] == "diverged" and summary["config"]["model"] == "mamba4rec"
    assert (out / "train_log.jsonl").read_text() == ""


def test_divergence_keeps_the_best_checkpoint_and_a_consistent_folder(tmp_path, tiny_data, monkeypatch):
    """The loss turns NaN in epoch 2: the run stops naming epoch 2 and keeps epoch 1's checkpoint."""
    validated = []
    real_evaluate, real_loss = m2rec.training.evaluate, SASRec.loss
    monkeypatch.setattr(m2rec.training, "evaluate", lambda *a, **k: validated.append(1) or real_evaluate(*a, **k))
    monkeypatch.setattr(SASRec, "loss", lambda self, *a, **k: real_loss(self, *a, **k) * (
        float("nan") if validated else 1.0))
    cfg = TrainConfig(model="sasrec", data=str(tiny_data), out_dir=str(tmp_path / "run"), max_len=20, epochs=5,
                      progress=False, threads=1)
    with pytest.raises(TrainingDiverged, match=r"^epoch 2: the training loss is nan.*diverged") as info:
        train(cfg, log=lambda msg: None)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert str(info.value).endswith(f"the best checkpoint is {checkpoint} (epoch 1)")
    assert info.value.checkpoint == checkpoint and info.value.best_epoch == 1
    assert load_checkpoint(checkpoint)[1]["epoch"] == 1
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert [r["epoch"] for r in log] == [1]
    assert summary["stopped"] == "diverged" and summary["best_epoch"] == 1 and summary["epochs_run"] == 1
    assert summary["best_valid"] == log[0]["valid"]


def test_weights_that_stop_being_finite_are_divergence_too(tmp_path, tiny_data, monkeypatch):
    real_step = torch.optim.Adam.step

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned_step)
    cfg = TrainConfig(model="sasrec", data=str(tiny_data), out_dir=str(tmp_path / "run"), max_len=20, epochs=2,
                      batch_size=4096, progress=False, threads=1)  # one step per epoch: the loss never sees it
    with pytest.raises(TrainingDiverged, match="^epoch 1: the weights are no longer finite"):
        train(cfg, log=lambda msg: None)
