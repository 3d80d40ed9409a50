"""A synthetic interaction log with periodic user behaviour and item texts, for offline demos and tests.

Items belong to categories. Each user repeats a personal cycle of categories (period 2-4, e.g.
jazz → thriller → jazz → cooking → ...) and at each step picks an item of the current category, popular
items more often (Zipf within the category); with probability ``noise`` the step is a uniformly random
item instead. The next item is therefore predictable from the last few items (sequence order and
periodicity matter), and an item's text names its category, so text embeddings carry signal too.
"""
from __future__ import annotations

import random
from typing import List

from .readers import RawInteractions

_CATEGORIES = (
    ("jazz album", "smooth", "late-night", "bebop", "live"),
    ("thriller film", "dark", "tense", "twisting", "noir"),
    ("cooking video", "quick", "vegetarian", "spicy", "family"),
    ("science fiction novel", "space", "dystopian", "time-travel", "robot"),
    ("running shoe", "lightweight", "trail", "cushioned", "racing"),
    ("board game", "strategy", "party", "cooperative", "card"),
    ("children's book", "bedtime", "animal", "picture", "rhyming"),
    ("history podcast", "ancient", "medieval", "war", "biography"),
    ("gardening tool", "pruning", "watering", "digging", "compost"),
    ("video game", "open-world", "puzzle", "racing", "platform"),
    ("cookware item", "cast-iron", "non-stick", "steel", "ceramic"),
    ("travel guide", "city", "island", "mountain", "budget"),
)


def make_synthetic(n_users: int = 300, n_items: int = 240, n_categories: int = 8, min_length: int = 20,
                   max_length: int = 60, noise: float = 0.1, zipf: float = 1.2, seed: int = 0,
                   name: str = "synthetic") -> RawInteractions:
    """Generate the log (raw ids: users ``u1..``, items ``1..n_items``, one day between steps)."""
    if not 1 <= n_categories <= len(_CATEGORIES):
        raise ValueError(f"n_categories must be in [1, {len(_CATEGORIES)}], got {n_categories}")
    if n_items < n_categories:
        raise ValueError(f"n_items ({n_items}) must be >= n_categories ({n_categories})")
    if not 3 <= min_length <= max_length:
        raise ValueError(f"need 3 <= min_length <= max_length, got {min_length}, {max_length}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    rng = random.Random(seed)
    category_items: List[List[int]] = [[] for _ in range(n_categories)]
    item_texts = {}
    for item in range(1, n_items + 1):
        c = (item - 1) % n_categories
        category_items[c].append(item)
        noun, *adjectives = _CATEGORIES[c]
        rank = len(category_items[c])
        item_texts[str(item)] = f"{adjectives[rank % len(adjectives)].capitalize()} {noun} no. {rank}"
    # Zipf weights within a category: the first items of each category are the popular ones.
    weights = [[1.0 / (r + 1) ** zipf for r in range(len(items))] for items in category_items]

    users, items, times = [], [], []
    for u in range(n_users):
        period = rng.randint(2, 4)
        cycle = [rng.randrange(n_categories) for _ in range(period)]
        length = rng.randint(min_length, max_length)
        start = rng.randrange(10**6)
        for t in range(length):
            if rng.random() < noise:
                item = rng.randint(1, n_items)
            else:
                c = cycle[t % period]
                item = rng.choices(category_items[c], weights[c])[0]
            users.append(f"u{u + 1}")
            items.append(str(item))
            times.append(float(start + 86400 * t))
    return RawInteractions(name, f"synthetic(seed={seed})", users, items, times, item_texts)
