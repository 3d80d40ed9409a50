"""Adapters that let other recommendation frameworks use m2rec's models (``recbole``: RecBole 1.2.x)."""
