"""Training, checkpoints, evaluation and the CLI, end to end on small synthetic data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _tolerance import assert_close
from m2rec.checkpoint import check_same_data, load_checkpoint
from m2rec.cli import main
from m2rec.data import build_sequences, load_dataset, make_synthetic
from m2rec.evaluation import evaluate
from m2rec.models import build_model
from m2rec.training import TrainConfig, train


def write_atomic(directory: Path, raw) -> Path:
    """Write a raw log as RecBole atomic files (so the path reader is exercised too)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{directory.name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u, i, t in zip(raw.users, raw.items, raw.timestamps):
            f.write(f"{u}\t{i}\t1\t{t:.0f}\n")
    with open(directory / f"{directory.name}.item", "w") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        for i, text in raw.item_texts.items():
            f.write(f"{i}\t{text}\n")
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    raw = make_synthetic(n_users=40, n_items=40, n_categories=4, min_length=8, max_length=14, seed=5)
    return write_atomic(tmp_path_factory.mktemp("data") / "tiny", raw)


def quiet(msg):
    pass


def small_config(tmp_path, data, model="sasrec", **kw):
    base = dict(model=model, data=str(data), out_dir=str(tmp_path / model), max_len=20, epochs=1,
                batch_size=32, progress=False, threads=1, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def test_end_to_end_cli_train_and_evaluate_beats_random(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "sasrec", "--data", "synthetic", "--epochs", "6", "--max-len", "30",
                 "--batch-size", "64", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    assert (out / "checkpoint.pt").is_file() and (out / "train_log.jsonl").is_file()
    assert main(["evaluate", str(out / "checkpoint.pt"), "--output", str(tmp_path / "test.json")]) == 0
    result = json.loads((tmp_path / "test.json").read_text())
    assert '"hr@10"' in capsys.readouterr().out  # the result is printed too
    n_items = load_dataset("synthetic").n_items
    m = result["metrics"]
    assert result["split"] == "test" and m["n_users"] == 300
    # a random ranking has HR@10 = 10 / n_items (about 0.04 here); the periodic data is learnable
    assert m["hr@10"] > 3 * 10 / n_items
    assert 0 < m["ndcg@10"] <= m["hr@10"] and m["mrr@10"] <= m["ndcg@10"]
    assert m["hr@20"] >= m["hr@10"]


def test_evaluate_matches_an_unbatched_per_user_computation():
    data = build_sequences(make_synthetic(n_users=25, n_items=30, n_categories=3, min_length=6,
                                          max_length=12, seed=2), k_core=1)
    model = build_model("sasrec", data.n_items, max_len=8).eval()
    got = evaluate(model, data, "test", max_len=8, batch_size=7)
    hr = ndcg = mrr = 0.0
    histories, targets = data.eval_pairs("test")
    for history, target in zip(histories, targets):
        h = torch.tensor([history[-8:]])
        with torch.no_grad():
            s = model.scores(h, torch.tensor([h.shape[1]]))[0]
        rank = int((s[1:] >= s[target]).sum())  # items (not padding) at least as good as the target
        if rank <= 10:
            hr, ndcg, mrr = hr + 1, ndcg + 1 / math.log2(rank + 1), mrr + 1 / rank
    n = len(targets)
    assert got["hr@10"] == pytest.approx(hr / n)
    assert got["ndcg@10"] == pytest.approx(ndcg / n)
    assert got["mrr@10"] == pytest.approx(mrr / n)


def test_same_seed_same_run_and_checkpoint_round_trip(tmp_path, tiny_dir):
    a = train(small_config(tmp_path / "a", tiny_dir, epochs=2), log=quiet)
    b = train(small_config(tmp_path / "b", tiny_dir, epochs=2), log=quiet)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    model, ckpt = load_checkpoint(a.checkpoint)
    data = load_dataset(str(tiny_dir))
    check_same_data(ckpt, data, "tiny")
    again = evaluate(model, data, "valid", max_len=20)
    assert {k: again[k] for k in a.best_valid} == pytest.approx(a.best_valid)
    other = build_sequences(make_synthetic(n_users=40, n_items=40, n_categories=4, min_length=8,
                                           max_length=14, seed=6))
    with pytest.raises(ValueError, match="differ"):
        check_same_data(ckpt, other, "other")


def test_early_stopping_stops_after_patience(tmp_path, tiny_dir):
    # lr so small that the weights do not move: validation never improves after epoch 1
    result = train(small_config(tmp_path, tiny_dir, epochs=10, patience=2, lr=1e-12), log=quiet)
    assert result.epochs_run == 3 and result.best_epoch == 1


def test_m2rec_with_text_and_ablations_train(tmp_path, tiny_dir):
    cache = tmp_path / "cache"
    full = train(small_config(tmp_path / "full", tiny_dir, model="m2rec", cache_dir=str(cache)), log=quiet)
    model, ckpt = load_checkpoint(full.checkpoint)
    assert model.use_semantic and model.use_frequency and ckpt["model_kwargs"]["d_text"] == 384
    assert torch.allclose(model.text_embeddings[1:].norm(dim=1), torch.ones(model.n_items), atol=1e-5)
    no_text = train(small_config(tmp_path / "nt", tiny_dir, model="m2rec", use_text=False), log=quiet)
    model, _ = load_checkpoint(no_text.checkpoint)
    assert not model.use_semantic
    no_freq = train(small_config(tmp_path / "nf", tiny_dir, model="m2rec", use_frequency=False,
                                 cache_dir=str(cache)), log=quiet)
    model, _ = load_checkpoint(no_freq.checkpoint)
    assert model.use_semantic and not model.use_frequency


def test_last_position_and_circular_filter(tmp_path, tiny_dir):
    result = train(small_config(tmp_path, tiny_dir, model="m2rec", filter="circular", use_text=False,
                                max_len=12), log=quiet)
    summary = json.loads((Path(result.checkpoint).parent / "train_summary.json").read_text())
    assert summary["all_positions"] is False  # non-causal: last-position targets only
    model, _ = load_checkpoint(result.checkpoint)
    assert not model.causal
    result = train(small_config(tmp_path / "lp", tiny_dir, last_position=True), log=quiet)
    summary = json.loads((Path(result.checkpoint).parent / "train_summary.json").read_text())
    assert summary["all_positions"] is False


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "sasrec", "--no-text", "--data", "synthetic"], "--no-text applies to --model m2rec"),
    (["train", "--model", "sasrec", "--data", "no-such-data"], "not a known data set name"),
    (["evaluate", "/nonexistent/checkpoint.pt"], "no such checkpoint"),
])
def test_cli_errors_are_one_clear_line(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_quality_report_is_built_from_the_commands_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("M2REC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["quality-report", "--data", "synthetic", "--only", "sasrec", "--epochs", "1"]) == 0
    out = tmp_path / "reports" / "quality-synthetic.json"  # named after the data, not ml-100k
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["name"] == "sasrec" and run["commands"][0].startswith("m2rec train --model sasrec")
    test = json.loads((tmp_path / "runs" / "quality-synthetic" / "sasrec" / "test.json").read_text())
    assert run["test"]["ndcg@10"] == test["metrics"]["ndcg@10"]  # copied from evaluate's output
    assert "embed_items" not in report  # SASRec reads no item texts: nothing was encoded
    assert not (tmp_path / "cache").exists()
    assert report["machine"]["torch"] == torch.__version__
    assert out.with_suffix(".log").read_text().count("$ m2rec ") == 2
    assert f"{test['metrics']['hr@10']:.4f}" in out.with_suffix(".md").read_text()
    # a second report into the same run folders is refused up front, before any run
    capsys.readouterr()
    assert main(["quality-report", "--data", "synthetic", "--only", "sasrec", "--epochs", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_quality_report_encodes_item_texts_for_m2rec_only(tmp_path, monkeypatch):
    import m2rec.experiments
    calls = []
    monkeypatch.setattr(m2rec.experiments, "_run", lambda argv, log: calls.append(argv) or pytest.skip("seen"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pytest.skip.Exception):
        main(["quality-report", "--data", "synthetic", "--only", "m2rec-no-semantic", "m2rec"])
    assert calls[0][:3] == ["embed-items", "--data", "synthetic"] and calls[0][-2:] == ["--threads", "1"]
    calls.clear()
    with pytest.raises(pytest.skip.Exception):
        main(["quality-report", "--data", "synthetic", "--only", "m2rec-no-semantic", "mamba4rec"])
    assert calls[0][0] == "train"


def test_text_embeddings_from_a_file(tmp_path, tiny_dir):
    n_items = load_dataset(str(tiny_dir)).n_items
    table = torch.nn.functional.normalize(torch.randn(n_items + 1, 16), dim=1)
    table[0] = 0
    torch.save(table, tmp_path / "table.pt")
    result = train(small_config(tmp_path, tiny_dir, model="m2rec", text_embeddings=str(tmp_path / "table.pt")),
                   log=quiet)
    model, _ = load_checkpoint(result.checkpoint)
    assert torch.equal(model.text_embeddings, table)
    torch.save(table[:-1], tmp_path / "short.pt")
    with pytest.raises(ValueError, match=f"needs n_items \\+ 1 = {n_items + 1}"):
        train(small_config(tmp_path / "b", tiny_dir, model="m2rec", text_embeddings=str(tmp_path / "short.pt")),
              log=quiet)


def test_cli_triton_backend_without_gpu_or_interpreter_fails_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc = main(["train", "--model", "m2rec", "--data", "synthetic", "--epochs", "1", "--backend", "triton",
               "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "interpreter" in err and "--backend" in err
    assert not (tmp_path / "run").exists()


def test_checkpoint_runs_on_any_backend_and_evaluate_checks_it(tmp_path, tiny_dir, monkeypatch, capsys):
    # the backend is a run-time choice: a checkpoint trained on one evaluates on the other, same scores
    result = train(small_config(tmp_path / "run", tiny_dir, model="m2rec", use_text=False), log=quiet)
    torch_model, _ = load_checkpoint(result.checkpoint, backend="torch")
    triton_model, _ = load_checkpoint(result.checkpoint, backend="triton")  # interpreter (conftest)
    items, lengths = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]), torch.tensor([3, 4])
    assert_close(triton_model.scores(items, lengths), torch_model.scores(items, lengths),
                               rtol=1e-4, atol=1e-4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["evaluate", str(result.checkpoint), "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "interpreter" in err and "Traceback" not in err
