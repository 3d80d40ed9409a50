"""M2Rec inside RecBole 1.2.1: RecBole's Config / create_dataset / data_preparation / Trainer on a tiny
atomic data set written here, and RecBole's full-ranking metrics checked against m2rec's own
preprocessing and evaluation on the same checkpoint.

Needs the ``recbole`` extra (``python3 tasks.py setup`` installs it). Without it the tests skip, except
under ``M2REC_REQUIRE_RECBOLE=1`` (set by ``tasks.py test``), where a missing extra is a failure.
"""
import os
import random
import sys

import pytest
import torch

try:
    import m2rec.integrations.recbole as rb
except ImportError as e:
    if os.environ.get("M2REC_REQUIRE_RECBOLE", "0") not in ("", "0"):
        raise
    pytest.skip(f"RecBole integration not installed: {e}", allow_module_level=True)

from recbole.data import create_dataset, data_preparation  # noqa: E402

from m2rec.data import DataFormatError, SequenceData, load_dataset  # noqa: E402
from m2rec.evaluation import evaluate  # noqa: E402
from m2rec.text_embeddings import encode_texts  # noqa: E402

# RecBole 1.2.1's own pandas chained-assignment and torch.cuda.amp deprecation warnings, not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:recbole.*")

GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Romance"]
N_USERS, N_ITEMS, N_RARE = 40, 30, 6
MISSING_ROW = 7  # an item with interactions but no .item row
MAX_LEN = 8


def expected_text(i: int) -> str:
    """The text m2rec's recipe must build from the .item row written below."""
    return f"Movie number {i} ({1990 + i % 20}). Genres: {GENRES[i % 5]}, {GENRES[(i * 3) % 5]}"


def write_dataset(root, name="tiny", with_item_file=True, seed=0):
    """A few dozen users and items in RecBole's atomic format: rows shuffled (the order must come from
    the timestamps), distinct timestamps, and rare items that the 5-core filter removes. The timestamps
    stay below 2**24, where RecBole's float32 copy of them is exact (above, nearby times tie in RecBole
    and keep file order, unlike m2rec's exact sort: the one protocol difference, see the README)."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir()
    rows, t = [], 1_000_000  # + at most ~600 * 1000 < 2**24
    for u in range(1, N_USERS + 1):
        for _ in range(rng.randint(6, 14)):
            rare = rng.random() < 0.03
            item = rng.randint(N_ITEMS + 1, N_ITEMS + N_RARE) if rare else rng.randint(1, N_ITEMS)
            t += rng.randint(1, 1000)
            rows.append((f"u{u}", f"m{item}", t))
    rng.shuffle(rows)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"] + [f"{u}\t{i}\t{t}" for u, i, t in rows]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    if with_item_file:
        lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        for i in range(N_ITEMS + N_RARE, 0, -1):
            if i != MISSING_ROW:
                lines.append(f"m{i}\tMovie number {i}\t{1990 + i % 20}\t{GENRES[i % 5]} {GENRES[(i * 3) % 5]}")
        (folder / f"{name}.item").write_text("\n".join(lines) + "\n")
    return folder


def make_config(root, dataset="tiny", **overrides):
    options = {"data_path": str(root), "epochs": 1, "train_batch_size": 64, "eval_batch_size": 16,
               "MAX_ITEM_LIST_LENGTH": MAX_LEN, "hidden_size": 16, "d_state": 8, "show_progress": False,
               "use_gpu": False, "checkpoint_dir": str(root / "saved"), "metric_decimal_place": 15,
               "text_cache_dir": str(root / "text-cache"), "seed": 2025}
    options.update(overrides)
    return rb.m2rec_config(dataset=dataset, config_dict=options)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short epoch through RecBole's pipeline; yields what the tests inspect."""
    root = tmp_path_factory.mktemp("recbole")
    write_dataset(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv[:1])  # RecBole's Config reads --key=value options from sys.argv
        mp.chdir(root)  # the Trainer writes log_tensorboard/ into the working directory
        config = make_config(root)
        # Config, create_dataset, data_preparation, Trainer.fit, reload of the best checkpoint, test
        result = rb.run(config, log_to_file=False)
        yield dict(result, root=root, config=config, mp=mp)


def test_batches_are_right_padded_and_ids_include_padding(run):
    """RecBole's ITEM_SEQ layout is m2rec's: ids left-aligned, zeros after ITEM_SEQ_LEN."""
    model, dataset = run["model"], run["dataset"]
    assert model.m2rec.n_items == dataset.item_num - 1 == model.n_items - 1
    assert dataset.field2id_token[dataset.iid_field][0] == "[PAD]"
    batch = next(iter(run["train_data"]))
    seq, length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    assert seq.shape[1] == MAX_LEN and int(length.min()) >= 1
    valid = torch.arange(MAX_LEN)[None, :] < length[:, None]
    assert bool((seq[valid] > 0).all()) and bool((seq[~valid] == 0).all())


def test_item_texts_follow_recbole_ids(run):
    model, dataset = run["model"], run["dataset"]
    tokens = dataset.field2id_token[dataset.iid_field]
    raw = rb.read_item_texts(run["root"] / "tiny" / "tiny.item", "item_id")
    texts = rb.texts_by_internal_id(dataset, raw)
    assert texts[0] == ""
    for internal_id, token in enumerate(tokens[1:], start=1):
        i = int(token[1:])
        assert texts[internal_id] == ("" if i == MISSING_ROW else expected_text(i)), token
    # RecBole's order is not m2rec's sorted order, so a wrong mapping would show here
    assert list(tokens[1:]) != sorted(tokens[1:], key=lambda s: int(s[1:]))
    table = model.m2rec.text_embeddings
    assert model.m2rec.use_semantic and table.shape[0] == dataset.item_num
    some = [j for j, t in enumerate(texts) if t][:3]
    torch.testing.assert_close(table[some], encode_texts([texts[j] for j in some], progress=False),
                               rtol=1e-4, atol=1e-5)
    empty = [j for j, t in enumerate(texts) if not t]  # [PAD] and the item without a row
    assert bool((table[empty] == 0).all())
    titles = rb.read_item_texts(run["root"] / "tiny" / "tiny.item", "item_id", text_fields=["movie_title"])
    assert titles["m12"] == "Movie number 12"
    with pytest.raises(DataFormatError, match="nope"):
        rb.read_item_texts(run["root"] / "tiny" / "tiny.item", "item_id", text_fields=["nope"])


def test_recbole_split_is_m2rec_protocol(run):
    """Same users, catalogue and test (history, target) pairs as m2rec's 5-core leave-one-out."""
    ours, dataset = load_dataset(str(run["root"] / "tiny"), k_core=5), run["dataset"]
    tokens = dataset.field2id_token[dataset.iid_field]
    assert sorted(ours.item_ids[1:]) == sorted(tokens[1:])
    assert ours.n_items < N_ITEMS + N_RARE  # the filter removed something
    test = run["test_data"].dataset.inter_feat
    users = dataset.field2id_token[dataset.uid_field]
    recbole_pairs = {}
    model = run["model"]
    for u, seq, n, target in zip(test[dataset.uid_field].tolist(), test[model.ITEM_SEQ].tolist(),
                                 test[model.ITEM_SEQ_LEN].tolist(), test[model.ITEM_ID].tolist()):
        recbole_pairs[users[u]] = ([tokens[i] for i in seq[:n]], tokens[target])
    histories, targets = ours.eval_pairs("test")
    ours_pairs = {user: ([ours.item_ids[i] for i in h][-MAX_LEN:], ours.item_ids[t])
                  for user, h, t in zip(ours.user_ids, histories, targets)}
    assert recbole_pairs == ours_pairs


def in_recbole_ids(ours: SequenceData, dataset) -> SequenceData:
    """m2rec's sequences with item ids renumbered into RecBole's internal ids (the model's columns)."""
    token_id = dataset.field2token_id[dataset.iid_field]
    tokens = list(dataset.field2id_token[dataset.iid_field])
    sequences = [[token_id[ours.item_ids[i]] for i in s] for s in ours.sequences]
    return SequenceData(ours.name, ours.source, ours.user_ids, tokens, [""] * len(tokens), sequences)


def test_recbole_metrics_equal_m2rec_evaluation_on_the_same_checkpoint(run):
    trainer, model, dataset = run["trainer"], run["model"], run["dataset"]
    assert os.path.isfile(run["checkpoint"]) and run["checkpoint"] == trainer.saved_model_file
    recbole = run["test_result"]  # run() reloaded the best checkpoint with load_trainer_checkpoint
    assert dict(trainer.evaluate(run["test_data"], load_best_model=False)) == recbole
    data = in_recbole_ids(load_dataset(str(run["root"] / "tiny"), k_core=5), dataset)
    ours = evaluate(model.m2rec, data, "test", max_len=MAX_LEN, ks=(10, 20))
    assert ours["n_users"] == len(run["test_data"].dataset) == N_USERS
    for k in (10, 20):
        for theirs, mine in (("hit", "hr"), ("ndcg", "ndcg"), ("mrr", "mrr")):
            assert recbole[f"{theirs}@{k}"] == pytest.approx(ours[f"{mine}@{k}"], abs=1e-12), (theirs, k)
    assert 0 < ours["hr@20"] < 1  # not a degenerate ranking
    print(f"\nRecBole {recbole}\nm2rec   {ours}")


def test_command_line_options_reach_recbole_config(run, monkeypatch, tmp_path):
    """python -m m2rec.integrations.recbole: --config_files and --key=value go to RecBole's Config."""
    import m2rec.integrations.recbole.pipeline as run_module
    extra = tmp_path / "mine.yaml"
    extra.write_text("hidden_size: 24\nn_layers: 2\n")
    seen = {}

    def fake_run(config):
        seen["config"] = config
        return {"best_valid_result": {}, "test_result": {}, "checkpoint": None}

    monkeypatch.setattr(run_module, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["m2rec-recbole", "--dataset=tiny", f"--data_path={run['root']}",
                                      f"--config_files={extra}", "--n_layers=3", "--filter_mode=circular"])
    assert run_module.main() == 0
    config = seen["config"]
    assert config["model"] == "M2Rec" and config["dataset"] == "tiny"
    assert config["hidden_size"] == 24 and config["n_layers"] == 3 and config["filter_mode"] == "circular"
    assert config["d_state"] == 32 and config["loss_type"] == "CE"  # from DEFAULT_CONFIG_FILE


def test_torch_env_switch_lets_recbole_reload_its_checkpoint(run):
    """The alternative to load_trainer_checkpoint: torch's own TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD."""
    trainer = run["trainer"]
    rb.load_trainer_checkpoint(trainer)
    want = trainer.evaluate(run["test_data"], load_best_model=False)
    run["mp"].setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    try:
        got = trainer.evaluate(run["test_data"], load_best_model=True)
    finally:
        run["mp"].delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    assert dict(got) == dict(want)


def test_predict_agrees_with_full_sort_predict(run):
    model = run["model"]
    batch = next(iter(run["test_data"]))[0]
    model.eval()
    with torch.no_grad():
        full = model.full_sort_predict(batch)
        assert full.shape == (len(batch), run["dataset"].item_num) and bool(torch.isneginf(full[:, 0]).all())
        items = batch[model.ITEM_ID]
        torch.testing.assert_close(model.predict(batch), full[torch.arange(len(batch)), items])


def test_bpr_without_item_file_or_text(run, tmp_path):
    """loss_type BPR with RecBole's negative sampling; no .item file -> no semantic branch."""
    write_dataset(tmp_path, "bare", with_item_file=False)
    config = make_config(tmp_path, dataset="bare", loss_type="BPR",
                         train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = rb.M2Rec(config, train_data.dataset)
    assert not model.m2rec.use_semantic
    batch = next(iter(train_data))
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.m2rec.item_embedding.weight.grad is not None
    off = rb.M2Rec(make_config(run["root"], use_text=False), run["train_data"].dataset)
    assert not off.m2rec.use_semantic
    with pytest.raises(FileNotFoundError, match="use_text: False"):
        rb.M2Rec(make_config(tmp_path, dataset="bare", text_fields=["movie_title"]), train_data.dataset)
