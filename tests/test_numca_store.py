"""Numca stores: idempotent, atomic, bounded, durable; the memory and Redis stores agree.

The Redis store runs against a real ``redis-server`` (the ``redis_server`` fixture).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from statevalue.numca_store import (
    Contribution,
    ContributionConflict,
    InMemoryNumcaStore,
    NumcaStore,
    RedisNumcaStore,
    StoreUnavailable,
    TableUpdate,
    open_numca_store,
    redacted,
)
from tests.servers import RedisServer

EMPTY, ONE, ONE_TWO = "", "1", "1,2"
READS = (EMPTY, ONE, ONE_TWO)


def contribution(key: str, *rewards: float) -> Contribution:
    """A group whose rollouts all pass through the empty set, {1} and {1, 2}."""
    return Contribution(key, repr(rewards), tuple(((EMPTY, ONE, ONE_TWO), r) for r in rewards))


def update(table: str, *contributions: Contribution) -> TableUpdate:
    return TableUpdate(table, contributions, READS)


StoreFactory = Callable[..., NumcaStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """Builds a store of the parametrised kind; every Redis store shares one server."""
    if request.param == "memory":
        return InMemoryNumcaStore
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda **kw: RedisNumcaStore(server.url, **kw)


def test_add_then_read(make_store: StoreFactory) -> None:
    store = make_store()
    [stats] = store.add_and_read([update("t", contribution("g1", 1.0, 0.0, 0.5))])
    assert stats == {EMPTY: (3, 1.5), ONE: (3, 1.5), ONE_TWO: (3, 1.5)}


def test_a_repeated_key_counts_once(make_store: StoreFactory) -> None:
    store = make_store()
    first = store.add_and_read([update("t", contribution("g1", 1.0, 0.0))])
    for _ in range(3):
        again = store.add_and_read([update("t", contribution("g1", 1.0, 0.0))])
        assert again == first
    other = store.add_and_read([update("t", contribution("g2", 1.0))])
    assert other[0][EMPTY] == (3, 2.0)
    stats = store.stats()
    assert (stats.counted, stats.repeated) == (2, 3)


def test_no_key_counts_every_time(make_store: StoreFactory) -> None:
    store = make_store()
    store.add_and_read([update("t", contribution("", 1.0))])
    [stats] = store.add_and_read([update("t", contribution("", 1.0))])
    assert stats[EMPTY] == (2, 2.0)


def test_a_reused_key_with_other_content_writes_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    store.add_and_read([update("a", contribution("g1", 1.0))])
    with pytest.raises(ContributionConflict) as caught:
        # Table "b" comes first and is new: it must stay unwritten too.
        store.add_and_read(
            [update("b", contribution("x", 1.0)), update("a", contribution("g1", 0.0))]
        )
    assert (caught.value.table, caught.value.key) == ("a", "g1")
    [a, b] = store.add_and_read([update("a"), update("b")])
    assert a[EMPTY] == (1, 1.0)
    assert b == {}


def test_tables_are_separate_and_unread_states_absent(make_store: StoreFactory) -> None:
    store = make_store()
    store.add_and_read([update("a", Contribution("k", "d", (((EMPTY,), 1.0),)))])
    [a, b] = store.add_and_read([update("a"), update("b")])
    assert a == {EMPTY: (1, 1.0)}
    assert b == {}


def test_least_recently_used_tables_go_first(make_store: StoreFactory) -> None:
    store = make_store(max_prompts=2)
    store.add_and_read([update("a", contribution("k", 1.0))])
    store.add_and_read([update("b", contribution("k", 1.0))])
    store.add_and_read([update("a")])  # a is now the most recently used
    store.add_and_read([update("c", contribution("k", 1.0))])
    [a, b, c] = store.add_and_read([update("a"), update("b"), update("c")])
    assert a and c and not b
    assert store.stats().tables == 2


def test_unused_tables_expire(make_store: StoreFactory) -> None:
    store = make_store(ttl_s=1)
    store.add_and_read([update("old", contribution("k", 1.0))])
    time.sleep(2.2)
    store.add_and_read([update("new", contribution("k", 1.0))])
    [old, new] = store.add_and_read([update("old"), update("new")])
    assert new and not old
    # The key expired with its table: the same group counts afresh.
    [again] = store.add_and_read([update("old", contribution("k", 1.0))])
    assert again[EMPTY] == (1, 1.0)


def test_memory_and_redis_add_in_the_same_doubles(redis_server: RedisServer) -> None:
    rewards = [0.1, 0.7, 1e-3, 0.3333333333333333, 2.5e-9, 0.9]
    memory, redis = InMemoryNumcaStore(), RedisNumcaStore(redis_server.url)
    for i, reward in enumerate(rewards):
        batch = [update("t", contribution(f"g{i}", reward, reward / 3))]
        assert memory.add_and_read(batch) == redis.add_and_read(batch)


def test_the_memory_snapshot_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "numca.json"
    store = InMemoryNumcaStore(snapshot=path)
    before = store.add_and_read([update("t", contribution("g1", 1.0, 0.0))])
    store.close()
    restarted = InMemoryNumcaStore(snapshot=path)
    assert restarted.add_and_read([update("t", contribution("g1", 1.0, 0.0))]) == before
    assert restarted.stats().repeated == 1


def test_redis_data_survives_a_redis_restart(redis_server: RedisServer) -> None:
    store = RedisNumcaStore(redis_server.url)
    before = store.add_and_read([update("t", contribution("g1", 1.0, 0.0))])
    redis_server.kill()
    redis_server.start()
    assert store.add_and_read([update("t")]) == before


def test_redis_down_is_unavailable_then_recovers(redis_server: RedisServer) -> None:
    store = RedisNumcaStore(redis_server.url, timeout_s=1.0)
    store.add_and_read([update("t", contribution("g1", 1.0))])
    redis_server.kill()
    with pytest.raises(StoreUnavailable, match="unavailable.*retry"):
        store.add_and_read([update("t", contribution("g2", 0.0))])
    assert store.stats().tables is None
    redis_server.start()
    [stats] = store.add_and_read([update("t", contribution("g2", 0.0))])
    assert stats[EMPTY] == (2, 1.0)


def test_store_urls() -> None:
    assert isinstance(open_numca_store("memory", 10), InMemoryNumcaStore)
    with pytest.raises(ValueError, match="memory' or a redis"):
        open_numca_store("postgres://x", 10)
    with pytest.raises(ValueError, match="snapshot"):
        open_numca_store("redis://127.0.0.1:1/0", 10, snapshot=Path("x.json"))
    assert redacted("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"
    assert redacted("redis://db:6379/0") == "redis://db:6379/0"
