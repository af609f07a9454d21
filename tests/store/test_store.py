"""Store: the catalog of a node's tables."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.store import Store, StoreError, Table, TableConflictError, UnknownTableError
from ekko.store.spec import TableSpec


def test_create_table_is_idempotent_for_the_same_spec() -> None:
    store = Store(origin=3, cache_capacity=8)
    spec = TableSpec("user", 8, 4)
    t = store.create_table(spec)
    assert isinstance(t, Table) and t.origin == 3 and t.cache_capacity == 8
    assert store.create_table(spec) is t
    assert store.catalog_version == 1
    store.create_table(TableSpec("item", 4, 2))
    assert store.catalog_version == 2
    assert store.specs() == [spec, TableSpec("item", 4, 2)]
    assert store.table("user") is t and set(store.tables) == {"user", "item"}


def test_conflicting_spec_names_both_and_changes_nothing() -> None:
    store = Store()
    t = store.create_table(TableSpec("user", 8, 4))
    t.write(np.array([1], dtype=np.int64), np.ones((1, 8)), now_ns=1)
    before = store.digests()
    with pytest.raises(TableConflictError) as info:
        store.create_table(TableSpec("user", 16, 4))
    msg = str(info.value)
    assert "dim=8" in msg and "dim=16" in msg and "user" in msg
    assert isinstance(info.value, StoreError)
    assert store.digests() == before and store.catalog_version == 1
    assert store.table("user") is t


def test_unknown_table_is_a_key_error_naming_it() -> None:
    store = Store()
    with pytest.raises(UnknownTableError, match="'ghost'") as info:
        store.table("ghost")
    assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)
    with pytest.raises(KeyError):
        store.table("ghost")


def test_tables_view_is_read_only() -> None:
    store = Store()
    store.create_table(TableSpec("a", 2, 1))
    with pytest.raises(TypeError):
        store.tables["b"] = store.table("a")  # type: ignore[index]


def test_digests_follow_content() -> None:
    """DESIGN.md §3 (the convergence invariant): equal content, equal digests."""
    a, b = Store(), Store(origin=1)
    spec = TableSpec("t", 2, 2)
    ta, tb = a.create_table(spec), b.create_table(spec)
    keys = np.array([4, 5, 6], dtype=np.int64)
    vals = np.arange(6, dtype=np.float32).reshape(3, 2)
    vers = ta.write(keys, vals, now_ns=10)
    assert a.digests() != b.digests()
    tb.apply(keys, vals, vers, np.full(3, 10), 0)
    assert a.digests() == b.digests()


def test_an_unknown_table_error_quotes_a_long_name_cut_short() -> None:
    """Found attacking the HTTP routes: a 404 for an unknown table echoed a 10 kB name."""
    store = Store()
    with pytest.raises(UnknownTableError) as err:
        store.table("x" * 10_000)
    message = str(err.value)
    assert len(message) < 200 and message.endswith("...' (10000 characters)"), message
    with pytest.raises(UnknownTableError, match=r"^unknown table 'emb'$"):
        store.table("emb")


def test_a_table_created_without_a_size_reserves_little_for_wide_rows() -> None:
    from ekko.store.store import DEFAULT_RESERVE_BYTES

    store = Store()
    wide = store.create_table(TableSpec("dense/top", 23_488, 1))
    assert wide.capacity * 23_488 * 4 <= max(DEFAULT_RESERVE_BYTES, 16 * 23_488 * 4)
    assert store.create_table(TableSpec("emb", 16, 4)).capacity >= 1024
    assert store.create_table(TableSpec("big", 16, 4), initial_rows=5000).capacity >= 5000
    wide.write(np.arange(40, dtype=np.int64), np.ones((40, 23_488), np.float32), now_ns=1)
    assert wide.rows == 40  # it grows as rows come
