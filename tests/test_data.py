"""Data readers, preprocessing (k-core, chronology, ids, leave-one-out) and batching.

Expected values are computed independently in the tests (plain loops over the written rows)."""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from m2rec.data import (DataFormatError, build_sequences, build_training_examples, iterate_batches,
                        k_core_rows, load_dataset, make_synthetic, pad_histories, read_atomic,
                        read_movielens_1m, read_movielens_100k, read_raw, recbole_ml100k_dir)
from m2rec.data.readers import ML100K_GENRES, RawInteractions

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def naive_k_core(rows, k):
    """Independent k-core: drop whichever side is below k, one user/item at a time, until stable."""
    rows = list(rows)
    changed = True
    while changed:
        changed = False
        users, items = defaultdict(int), defaultdict(int)
        for u, i, *_ in rows:
            users[u] += 1
            items[i] += 1
        bad_users = {u for u, c in users.items() if c < k}
        if bad_users:
            rows = [r for r in rows if r[0] not in bad_users]
            changed = True
            continue
        bad_items = {i for i, c in items.items() if c < k}
        if bad_items:
            rows = [r for r in rows if r[1] not in bad_items]
            changed = True
    return rows


# ------------------------------------------------------------------------------------------------
# readers


def test_atomic_reader_reads_ids_times_and_item_texts(tmp_path):
    inter = write(tmp_path / "toy.inter", INTER_HEADER + "1\t10\t4\t100\n2\t10\t3.5\t50\n1\t11\t5\t90\n")
    write(tmp_path / "toy.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                 "10\tThe Film\t1999\tDrama Sci-Fi\n11\tOther\t\t\n")
    raw = read_atomic(inter)
    assert raw.users == ["1", "2", "1"] and raw.items == ["10", "10", "11"]
    assert raw.timestamps == [100.0, 50.0, 90.0]
    assert raw.item_texts == {"10": "The Film (1999). Genres: Drama, Sci-Fi", "11": "Other"}
    assert raw.name == "toy"


def test_atomic_reader_without_timestamp_keeps_row_order(tmp_path):
    rows = [("u", "3"), ("v", "2"), ("u", "1"), ("w", "1"), ("v", "3"), ("u", "2"), ("w", "2"),
            ("v", "1"), ("w", "3")]
    inter = write(tmp_path / "a.inter", "item_id:token\tuser_id:token\n" + "".join(
        f"{i}\t{u}\n" for u, i in rows))
    raw = read_atomic(inter)
    assert raw.timestamps is None and raw.items == [i for _, i in rows]
    data = build_sequences(raw, k_core=3)
    for user, seq in zip(data.user_ids, data.sequences):
        assert [data.item_ids[j] for j in seq] == [i for u, i in rows if u == user]


@pytest.mark.parametrize("content, line, problem", [
    ("user_id:token\titem_id:token\n1\t2\n3\n", 3, "expected 2 tab-separated fields"),
    ("user_id:token\trating:float\n1\t2\n", 1, "missing column 'item_id'"),
    (INTER_HEADER + "1\t2\t3\t100\n1\t2\tfive\t100\n", 3, "'rating': 'five' is not a number"),
    (INTER_HEADER + "1\t2\t3\tnan\n", 2, "'timestamp': 'nan' is not a finite number"),
    (INTER_HEADER + "1\t\t3\t100\n", 2, "column 'item_id' is empty"),
    ("user_id\titem_id:token\n", 1, "not of the form name:type"),
    ("user_id:token\titem_id:tokn\n", 1, "unknown type 'tokn'"),
    ("", 1, "file is empty"),
    (INTER_HEADER.replace("\t", ","), 1, "separated by commas; RecBole atomic files must be tab-separated"),
    (INTER_HEADER.replace("\t", " "), 1, "separated by spaces; RecBole atomic files must be tab-separated"),
    (INTER_HEADER.replace("\t", ";"), 1, "separated by semicolons; RecBole atomic files must be tab-separated"),
])
def test_atomic_reader_errors_name_file_line_and_problem(tmp_path, content, line, problem):
    path = write(tmp_path / "bad.inter", content)
    with pytest.raises(DataFormatError) as info:
        read_atomic(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert problem in message
    assert info.value.line == line and info.value.path == str(path)


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "enc.inter"
    path.write_bytes(INTER_HEADER.encode() + b"1\t2\t3\t4\n" + "1\tcaf\u00e9\t3\t4\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=rf"^{path}:3: cannot decode .* utf-8"):
        read_atomic(path)


def test_unknown_encoding_name_is_reported(tmp_path):
    path = write(tmp_path / "x.inter", INTER_HEADER)
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        read_atomic(path, encoding="klingon")


def test_movielens_100k_raw_reader(tmp_path):
    write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n", "latin-1")
    flags = ["0"] * len(ML100K_GENRES)
    flags[ML100K_GENRES.index("Comedy")] = flags[ML100K_GENRES.index("Drama")] = "1"
    write(tmp_path / "u.item", "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(flags) + "\n"
          + "302|Caf\u00e9 (1997)|01-Jan-1997||http://y|" + "|".join(["0"] * 18 + ["1"]) + "\n", "latin-1")
    raw = read_movielens_100k(tmp_path)
    assert raw.users == ["196", "186"] and raw.items == ["242", "302"]
    assert raw.timestamps == [881250949.0, 891717742.0]
    assert raw.item_texts == {"242": "Kolya (1996). Genres: Comedy, Drama",
                              "302": "Caf\u00e9 (1997). Genres: Western"}
    assert read_raw(tmp_path).items == raw.items  # the directory layout is recognised


def test_movielens_100k_bad_item_line(tmp_path):
    write(tmp_path / "u.data", "1\t2\t3\t4\n")
    write(tmp_path / "u.item", "2|Short|line\n")
    with pytest.raises(DataFormatError, match=rf"^{tmp_path / 'u.item'}:1: expected 24 '\|'-separated"):
        read_movielens_100k(tmp_path)


def test_movielens_1m_raw_reader_and_errors(tmp_path):
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n", "latin-1")
    write(tmp_path / "movies.dat", "1193::One Flew (1975)::Drama\n661::James (1996)::Animation|Musical\n",
          "latin-1")
    raw = read_movielens_1m(tmp_path)
    assert raw.items == ["1193", "661"] and raw.timestamps == [978300760.0, 978302109.0]
    assert raw.item_texts["661"] == "James (1996). Genres: Animation, Musical"
    assert read_raw(tmp_path).name == "ml-1m"
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(DataFormatError, match=rf"^{tmp_path / 'ratings.dat'}:2: expected 4 '::'-separated"):
        read_movielens_1m(tmp_path)
    write(tmp_path / "ratings.dat", "1::1193::5::97830x\n")
    with pytest.raises(DataFormatError, match=rf"^{tmp_path / 'ratings.dat'}:1: column 'timestamp'"):
        read_movielens_1m(tmp_path)


def test_unknown_data_names_and_directories(tmp_path):
    with pytest.raises(ValueError, match="not an existing path and not a known data set name"):
        read_raw("no-such-data-set")
    with pytest.raises(ValueError, match="no data found"):
        read_raw(tmp_path)


# ------------------------------------------------------------------------------------------------
# preprocessing


def random_log(seed, n_rows=600, n_users=40, n_items=60):
    """Skewed users and items (exponential popularity), so some fall below the core and others not."""
    rng = random.Random(seed)
    return [(f"u{min(n_users, int(rng.expovariate(8 / n_users)))}",
             str(min(n_items, 1 + int(rng.expovariate(6 / n_items)))), rng.randrange(30))
            for _ in range(n_rows)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_core_matches_independent_filter_and_is_stable(seed):
    rows = random_log(seed)
    users, items = [r[0] for r in rows], [r[1] for r in rows]
    kept = k_core_rows(users, items, 5)
    expected = naive_k_core(rows, 5)
    assert [rows[i] for i in kept] == expected
    assert len(expected) > 0  # the test data must exercise a non-trivial core
    assert len(expected) < len(rows)
    # stable: filtering the result again removes nothing, and every count is >= 5
    again = k_core_rows([users[i] for i in kept], [items[i] for i in kept], 5)
    assert again == list(range(len(kept)))


def test_k_core_needs_repetition():
    # Item "x" has 5 rows, but user "b" (4 rows) goes first and then "x" drops to 4: both must go.
    rows = [("a", "x")] * 4 + [("b", "x")] + [("b", "y")] * 3 + [("a", "y")] * 2
    rows += [("c", "y")] * 5 + [("c", "x")] * 0
    users, items = [r[0] for r in rows], [r[1] for r in rows]
    kept = {rows[i] for i in k_core_rows(users, items, 5)}
    assert ("b", "x") not in kept and ("a", "x") not in kept
    assert kept == set(naive_k_core(rows, 5))


def test_sequences_are_chronological_with_ties_in_row_order_and_ids_remapped():
    # user u: times 5, 1, 5, 3 on items 30, 20, 10, 40 -> chronological 20, 40, then the tie 30, 10.
    raw = RawInteractions("t", "t", ["u", "u", "u", "u", "v", "v", "v"],
                          ["30", "20", "10", "40", "10", "9", "30"], [5, 1, 5, 3, 0, 2, 1])
    data = build_sequences(raw, k_core=1)
    assert data.item_ids == ["[PAD]", "9", "10", "20", "30", "40"]  # numeric order, 0 = padding
    remap = {raw_id: j for j, raw_id in enumerate(data.item_ids)}
    assert data.user_ids == ["u", "v"]
    assert data.sequences[0] == [remap[i] for i in ("20", "40", "30", "10")]
    assert data.sequences[1] == [remap[i] for i in ("10", "30", "9")]
    assert data.n_items == 5 and data.item_texts == [""] * 6


# Ids that tie under a numeric-only key ("7", "07", "007"), non-ASCII digits that pass str.isdigit
# but not int() ("²") or that int() reads as numbers ("٣" = 3), and plain text, upper before lower case.
AWKWARD_IDS = ["007", "b", "10", "²", "7", "B", "010", "٣", "07", "8", "a"]
AWKWARD_ORDER = ["007", "07", "7", "8", "010", "10", "B", "a", "b", "²", "٣"]


def _awkward_inter(path: Path, ids=AWKWARD_IDS) -> Path:
    """Each id is both a user (3 items) and an item (3 users), so nothing is filtered."""
    n = len(ids)
    rows = [f"{ids[u]}\t{ids[(u + s) % n]}\t1\t{s}\n" for u in range(n) for s in range(3)]
    return write(path, INTER_HEADER + "".join(rows))


def test_id_numbering_is_a_total_order_of_the_ids_text(tmp_path):
    data = build_sequences(read_atomic(_awkward_inter(tmp_path / "ids.inter")), k_core=1)
    assert data.item_ids == ["[PAD]"] + AWKWARD_ORDER
    assert data.user_ids == AWKWARD_ORDER


def test_id_numbering_does_not_depend_on_the_hash_seed(tmp_path):
    """Set iteration order follows PYTHONHASHSEED; the numbering must not (ties such as "7"/"07" once
    left it to the set)."""
    import os
    import subprocess
    import sys
    inter = _awkward_inter(tmp_path / "ids.inter", [i for i in AWKWARD_IDS if i.isascii()])
    code = ("import json, sys; from m2rec.data import build_sequences, read_atomic; "
            "d = build_sequences(read_atomic(sys.argv[1]), k_core=1); "
            "print(json.dumps([d.item_ids, d.user_ids, d.sequences]))")
    outs = set()
    for seed in ("1", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", code, str(inter)], env=env, capture_output=True,
                              text=True, check=True)
        outs.add(proc.stdout)
    assert len(outs) == 1, "the numbering changed with PYTHONHASHSEED"


def test_leave_one_out_split():
    raw = RawInteractions("t", "t", ["a"] * 5 + ["b"] * 3 + ["c"] * 2, list("12345") + list("321") + list("12"),
                          list(range(10)))
    data = build_sequences(raw, k_core=1)
    assert data.user_ids == ["a", "b"]  # c has only 2 interactions: no validation/test split possible
    a, b = data.sequences
    assert data.train_sequences() == [a[:3], b[:1]]
    hist, targets = data.eval_pairs("valid")
    assert hist == [a[:3], b[:1]] and targets == [a[3], b[1]]
    hist, targets = data.eval_pairs("test")
    assert hist == [a[:4], b[:2]] and targets == [a[4], b[2]]
    with pytest.raises(ValueError, match="split must be"):
        data.eval_pairs("train")


def test_empty_after_filtering_names_the_file(tmp_path):
    inter = write(tmp_path / "small.inter", INTER_HEADER + "1\t2\t3\t4\n1\t3\t3\t5\n")
    with pytest.raises(DataFormatError, match=rf"^{inter}: no interactions left after 5-core"):
        build_sequences(read_atomic(inter))


def test_recbole_ml100k_is_found_and_loads_with_independent_counts():
    directory = recbole_ml100k_dir()
    if directory is None:
        pytest.skip("recbole is not installed (pip install --no-deps recbole)")
    rows = []
    with open(directory / "ml-100k.inter", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert header[:2] == ["user_id:token", "item_id:token"]
        for n, line in enumerate(f):
            user, item, _, stamp = line.rstrip("\n").split("\t")
            rows.append((user, item, float(stamp), n))
    core = naive_k_core(rows, 5)
    data = load_dataset("ml-100k")
    assert data.n_users == len({r[0] for r in core})
    assert data.n_items == len({r[1] for r in core})
    assert data.n_interactions == len(core)
    # one user's sequence, ordered independently
    user = data.user_ids[7]
    mine = sorted((r for r in core if r[0] == user), key=lambda r: (r[2], r[3]))
    assert [data.item_ids[j] for j in data.sequences[7]] == [r[1] for r in mine]
    assert data.item_texts[data.item_ids.index("1")].startswith("Toy Story (1995). Genres: Animation")


def test_synthetic_is_deterministic_periodic_and_has_texts():
    a, b = make_synthetic(n_users=20, seed=3), make_synthetic(n_users=20, seed=3)
    assert a.items == b.items and a.users == b.users
    assert a.items != make_synthetic(n_users=20, seed=4).items
    data = build_sequences(make_synthetic(n_users=50, noise=0.0, seed=1), k_core=1)  # keep every step
    assert all(data.item_texts[1:])
    # without noise every step follows the user's category cycle: categories repeat with period <= 4
    n_categories = 8
    raw_category = {j: (int(data.item_ids[j]) - 1) % n_categories for j in range(1, data.n_items + 1)}
    periodic = 0
    for seq in data.sequences:
        cats = [raw_category[j] for j in seq]
        periodic += any(all(cats[t] == cats[t - p] for t in range(p, len(cats))) for p in (2, 3, 4))
    assert periodic == len(data.sequences)


# ------------------------------------------------------------------------------------------------
# batching


def test_all_position_examples_cover_every_target_once_with_history():
    seqs = [list(range(1, 12)), [20, 21], [30]]
    ex = build_training_examples(seqs, max_len=4, all_positions=True)
    pairs = []
    for x, n, y in zip(ex.inputs.tolist(), ex.lengths.tolist(), ex.targets.tolist()):
        assert all(v == 0 for v in x[n:]) and all(v == 0 for v in y[n:])
        assert x[1:n] == y[:n - 1]  # the target at t is the input at t + 1
        pairs += [(tuple(x[:t + 1]), y[t]) for t in range(n)]
    targets = sorted(p[1] for p in pairs)
    assert targets == list(range(2, 12)) + [21]  # every item but each first is a target once
    for history, target in pairs:  # each history is the items right before the target
        seq = seqs[0] if target < 20 else seqs[1]
        pos = seq.index(target)
        assert list(history) == seq[pos - len(history):pos]
    assert ex.inputs.shape == (4, 4) and ex.n_targets == 11


def test_last_position_examples():
    ex = build_training_examples([[1, 2, 3, 4, 5]], max_len=2, all_positions=False)
    assert ex.targets.tolist() == [2, 3, 4, 5]
    assert ex.inputs.tolist() == [[1, 0], [1, 2], [2, 3], [3, 4]]
    assert ex.lengths.tolist() == [1, 2, 2, 2]


def test_batches_are_trimmed_and_cover_all_examples():
    ex = build_training_examples([[1, 2, 3], [4, 5, 6, 7, 8, 9]], max_len=10, all_positions=True)
    g = torch.Generator().manual_seed(0)
    seen = []
    for x, n, y in iterate_batches(ex, batch_size=1, shuffle=True, generator=g):
        assert x.shape == (1, int(n.max())) and y.shape == x.shape
        seen.append(tuple(x[0].tolist()))
    assert sorted(seen) == [(1, 2), (4, 5, 6, 7, 8)]


def test_pad_histories_keeps_the_most_recent_items():
    x, n = pad_histories([[1, 2, 3, 4], [5]], max_len=3)
    assert x.tolist() == [[2, 3, 4], [5, 0, 0]] and n.tolist() == [3, 1]
    with pytest.raises(ValueError, match="history 1 is empty"):
        pad_histories([[1], []], max_len=3)
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        pad_histories([[1]], max_len=0)
