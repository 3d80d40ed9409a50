"""From a raw interaction log to per-user item sequences (DESIGN §7, RecBole's sequential protocol).

* k-core filtering (default 5): users and items with fewer than k interactions are removed, repeatedly,
  until every remaining user and item has at least k (removing items can push users below k). Users
  also need at least 3 interactions (a training item, a validation and a test target), which only
  matters for k < 3 (k = 1 means no filtering beyond that).
* Chronological order per user: a stable sort on the timestamp, so ties keep the file's row order
  (rows without timestamps keep their row order).
* Ids: items are renumbered 1..n_items in the order of :func:`id_sort_key` on their raw ids, 0 is
  padding; users likewise 0..n_users-1. The order is total (no two distinct ids tie), so the numbering
  is a function of the file's contents alone, never of set iteration order or ``PYTHONHASHSEED``:
  ids made of ASCII digits come first, by numeric value and then by their text ("007" < "07" < "7" <
  "8"); every other id follows, by its text (code-point order). Only ASCII digits count as numbers:
  "²" or "٣" pass ``str.isdigit`` but are ordered as text.
* Leave-one-out: the last item of each user is the test target, the second-to-last the validation
  target, the rest is training data. All interactions are kept (implicit feedback, ratings ignored).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from .errors import DataFormatError
from .readers import RawInteractions

PAD_ID = 0
# Each user needs a training item, a validation target and a test target.
MIN_SEQUENCE_LENGTH = 3


def id_sort_key(raw_id: str) -> Tuple[int, int, str]:
    """Sort key of a raw id: a total order (the text itself is the last component, so equal keys mean
    equal ids) that puts ASCII-digit ids first in numeric order."""
    if raw_id.isascii() and raw_id.isdigit():
        return (0, int(raw_id), raw_id)
    return (1, 0, raw_id)


def k_core_rows(users: Sequence[str], items: Sequence[str], k: int, min_user: int = 0) -> List[int]:
    """Indices of the rows that survive iterated k-core filtering: every remaining item has >= k rows
    and every remaining user >= max(k, min_user)."""
    keep = list(range(len(users)))
    k_user = max(k, min_user)
    while True:
        user_count = Counter(users[i] for i in keep)
        item_count = Counter(items[i] for i in keep)
        kept = [i for i in keep if user_count[users[i]] >= k_user and item_count[items[i]] >= k]
        if len(kept) == len(keep):
            return kept
        keep = kept


@dataclass
class SequenceData:
    """Per-user chronological item sequences with remapped ids.

    ``item_ids[j]`` is the raw id of item j (``item_ids[0]`` is the padding placeholder) and
    ``item_texts[j]`` its text ("" when none); ``sequences[u]`` is user ``user_ids[u]``'s sequence.
    """

    name: str
    source: str
    user_ids: List[str]
    item_ids: List[str]
    item_texts: List[str]
    sequences: List[List[int]]

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def train_sequences(self) -> List[List[int]]:
        """Each user's items before the validation target."""
        return [s[:-2] for s in self.sequences]

    def eval_pairs(self, split: str) -> Tuple[List[List[int]], List[int]]:
        """``(histories, targets)`` for ``split``: "valid" predicts the second-to-last item from what
        precedes it; "test" predicts the last item from everything before it (train + valid)."""
        if split == "valid":
            return [s[:-2] for s in self.sequences], [s[-2] for s in self.sequences]
        if split == "test":
            return [s[:-1] for s in self.sequences], [s[-1] for s in self.sequences]
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def summary(self) -> Dict[str, object]:
        n = self.n_interactions
        return {"name": self.name, "source": self.source, "n_users": self.n_users,
                "n_items": self.n_items, "n_interactions": n,
                "density": n / max(1, self.n_users * self.n_items)}


def build_sequences(raw: RawInteractions, k_core: int = 5) -> SequenceData:
    """k-core filter, order chronologically, remap ids; see the module docstring for the rules."""
    if isinstance(k_core, bool) or not isinstance(k_core, int) or k_core < 1:
        raise ValueError(f"k_core must be a positive integer, got {k_core!r}")
    if len(raw) == 0:
        raise DataFormatError(raw.source, "no interactions in the file")
    rows = k_core_rows(raw.users, raw.items, k_core, min_user=MIN_SEQUENCE_LENGTH)
    if not rows:
        raise DataFormatError(
            raw.source, f"no interactions left after {k_core}-core filtering (users need >= "
                        f"{max(k_core, MIN_SEQUENCE_LENGTH)} interactions) ({len(raw)} rows, "
                        f"{len(set(raw.users))} users, {len(set(raw.items))} items before)")
    if raw.timestamps is not None:
        times = raw.timestamps
        rows.sort(key=lambda i: times[i])  # stable: ties keep row order
    item_ids = sorted({raw.items[i] for i in rows}, key=id_sort_key)
    user_ids = sorted({raw.users[i] for i in rows}, key=id_sort_key)
    item_index = {raw_id: j + 1 for j, raw_id in enumerate(item_ids)}
    user_index = {raw_id: u for u, raw_id in enumerate(user_ids)}
    sequences: List[List[int]] = [[] for _ in user_ids]
    for i in rows:
        sequences[user_index[raw.users[i]]].append(item_index[raw.items[i]])
    texts = [""] + [raw.item_texts.get(raw_id, "") for raw_id in item_ids]
    return SequenceData(raw.name, raw.source, user_ids, ["[PAD]"] + item_ids, texts, sequences)
