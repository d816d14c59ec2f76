"""The activation store: the one owner of its on-disk layout, in four parts:

- ``layout``: what the files and arrays are, how a store is planned, created and removed;
- ``commits``: which extraction batches are fully written (a log per directory or bucket);
- ``reader``: ``Store`` and ``open_store``, reading rows (and writing them, for extraction);
- ``repair``: finding damaged chunks, repairing them, and ``python -m sae_core.store``.

Training's shuffled, laned reading order is not here: it is ``jax_sae.order``, its only user.
"""

from .commits import CommitLog, commit_log
from .layout import (
    FORMAT_VERSION,
    PLAN_ARRAYS,
    STORE_DTYPES,
    StoreError,
    StoreMeta,
    MLP_STREAMS,
    acts_name,
    chunk_key,
    chunk_rows_for,
    estimate_bytes,
    foreign_keys,
    remove_store,
    sample_blocks,
)
from .reader import Store, create_store, open_store, rebatched
from .repair import Damage, StoreCommand, find_damage, main, repair, run_command

__all__ = [
    "FORMAT_VERSION", "PLAN_ARRAYS", "STORE_DTYPES", "CommitLog", "Damage", "Store", "StoreCommand", "StoreError",
    "MLP_STREAMS", "StoreMeta", "acts_name", "chunk_key", "chunk_rows_for", "commit_log", "create_store", "estimate_bytes", "find_damage",
    "foreign_keys", "main", "open_store", "rebatched", "remove_store", "repair", "run_command", "sample_blocks",
]
