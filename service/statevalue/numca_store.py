"""Where Numca tables live between requests that share a ``prompt_id`` (docs/design.md).

A store keeps, per table, the count and reward sum of every state, and the idempotency
key of every group already counted. One call adds a request's groups and reads back the
states it needs, atomically: a retried or duplicated group (same key, same content) counts
once, and a key that comes back with other content refuses the whole call before anything
is written.

- ``InMemoryNumcaStore``: one process (the default); optionally saved to a file when the
  server stops and loaded when it starts.
- ``RedisNumcaStore``: every replica reads and writes the same tables in one Redis; a Lua
  script makes each call one atomic step there.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("statevalue.numca_store")

Stats = tuple[int, float]
"""A state's (count, reward sum)."""


def encode_state(state: frozenset[str]) -> str:
    """The store's name for a state: its numbers sorted and comma-joined ("" = no number).

    Numbers are digits, "." and "/" only (estimators/numca.py), so "," cannot be in one.
    """
    return ",".join(sorted(state))


@dataclass(frozen=True)
class Contribution:
    """One group's rewarded rollouts: (encoded states counted, reward) per rollout.

    ``key`` identifies the group across retries ("" = none: counted every time it is sent);
    ``digest`` hashes the group's content (tokens and rewards), to tell a retry (same) from
    a reused key (different).
    """

    key: str
    digest: str
    rows: tuple[tuple[tuple[str, ...], float], ...]


@dataclass(frozen=True)
class TableUpdate:
    """What one request does to one table: add ``contributions``, then read ``reads``."""

    table: str
    contributions: tuple[Contribution, ...]
    reads: tuple[str, ...]


@dataclass(frozen=True)
class StoreStats:
    """Sizes and counters for the metrics; ``bytes`` is approximate (None: unknown)."""

    tables: int | None
    bytes: int | None
    counted: int
    repeated: int


class StoreUnavailable(RuntimeError):
    """The store cannot be reached; the call changed nothing that a retry would repeat."""


class ContributionConflict(ValueError):
    """``key`` was counted in ``table`` before with other rollouts or rewards."""

    def __init__(self, table: str, key: str) -> None:
        super().__init__(f"key {key!r} was already counted with other content")
        self.table = table
        self.key = key


class NumcaStore(Protocol):
    """Keeps every prompt's Numca table; safe to call from several threads."""

    def add_and_read(self, updates: Sequence[TableUpdate]) -> list[dict[str, Stats]]:
        """Add every contribution whose key is new, then read each update's states.

        Returns, per update, the (count, sum) of each state read that has been counted.
        Raises ContributionConflict (nothing written) or StoreUnavailable.
        """
        ...

    def stats(self) -> StoreStats: ...

    def ping(self) -> bool:
        """Whether the store answers now (readiness)."""
        ...

    def describe(self) -> str:
        """Where the tables live, for logs and messages (no credentials)."""
        ...

    def close(self) -> None:
        """Save what needs saving and release connections (server shutdown)."""
        ...


@dataclass
class _Table:
    stats: dict[str, list[float]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    used: float = 0.0


def _apply(table: _Table, contribution: Contribution) -> None:
    for states, reward in contribution.rows:
        for state in states:
            stats = table.stats.setdefault(state, [0, 0.0])
            stats[0] += 1
            stats[1] += reward


class InMemoryNumcaStore:
    """Tables in this process, least recently used first out past ``max_prompts``.

    ``ttl_s`` drops a table unused for that long; ``snapshot`` is a JSON file loaded at
    start (if it exists) and written by ``close()``, so tables survive a clean restart.
    """

    def __init__(
        self,
        max_prompts: int = 100_000,
        ttl_s: float = 0.0,
        snapshot: Path | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._max_prompts = max_prompts
        self._ttl_s = ttl_s
        self._snapshot = snapshot
        self._tables: OrderedDict[str, _Table] = OrderedDict()
        self._counted = self._repeated = 0
        if snapshot is not None and snapshot.exists():
            self._load(snapshot)

    def add_and_read(self, updates: Sequence[TableUpdate]) -> list[dict[str, Stats]]:
        with self._lock:
            now = time.time()
            self._expire(now)
            for update in updates:
                table = self._tables.get(update.table)
                for contribution in update.contributions:
                    seen = None if table is None else table.keys.get(contribution.key)
                    if contribution.key and seen is not None and seen != contribution.digest:
                        raise ContributionConflict(update.table, contribution.key)
            replies = []
            for update in updates:
                table = self._tables.pop(update.table, None) or _Table()
                self._tables[update.table] = table  # most recently used last
                table.used = now
                for contribution in update.contributions:
                    if contribution.key and contribution.key in table.keys:
                        self._repeated += 1
                        continue
                    if contribution.key:
                        table.keys[contribution.key] = contribution.digest
                    _apply(table, contribution)
                    self._counted += 1
                replies.append(
                    {
                        s: (int(table.stats[s][0]), table.stats[s][1])
                        for s in update.reads
                        if s in table.stats
                    }
                )
            while len(self._tables) > self._max_prompts:
                self._tables.popitem(last=False)
            return replies

    def _expire(self, now: float) -> None:
        if self._ttl_s <= 0:
            return
        while self._tables:
            name, table = next(iter(self._tables.items()))
            if now - table.used <= self._ttl_s:
                break
            del self._tables[name]

    def stats(self) -> StoreStats:
        with self._lock:
            states = sum(len(t.stats) for t in self._tables.values())
            keys = sum(len(t.keys) for t in self._tables.values())
            # Rough CPython sizes: a dict entry with a short string key and a 2-list, per
            # state; a short key and digest per idempotency key; a table's own objects.
            approx = 200 * states + 180 * keys + 600 * len(self._tables)
            return StoreStats(len(self._tables), approx, self._counted, self._repeated)

    def ping(self) -> bool:
        """Always: the tables live in this process."""
        return True

    def describe(self) -> str:
        return "memory" + (f" (snapshot {self._snapshot})" if self._snapshot else "")

    def close(self) -> None:
        if self._snapshot is not None:
            self.save(self._snapshot)

    def save(self, path: Path) -> None:
        """Write every table to ``path`` (atomically: a reader never sees half a file)."""
        with self._lock:
            data = {
                "format": 1,
                "tables": {
                    name: {"stats": t.stats, "keys": t.keys, "used": t.used}
                    for name, t in self._tables.items()
                },
            }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        log.info("saved %d Numca tables to %s", len(data["tables"]), path)

    def _load(self, path: Path) -> None:
        data = json.loads(path.read_text())
        if data.get("format") != 1:
            raise ValueError(f"{path}: not a Numca snapshot of a known format")
        for name, t in data["tables"].items():
            self._tables[name] = _Table(stats=t["stats"], keys=t["keys"], used=t["used"])
        self._expire(time.time())
        log.info("loaded %d Numca tables from %s", len(self._tables), path)


# One atomic step in Redis: refuse on a conflicting key before writing anything, count the
# new contributions, read, refresh the TTL and the LRU index, evict past the bound. Sums
# are kept as %.17g strings so Redis adds in doubles exactly as the in-memory store does.
_ADD_AND_READ = """
local req = cjson.decode(ARGV[1])
local prefix = req.prefix
for i, t in ipairs(req.tables) do
  local keys = prefix .. t.id .. ':keys'
  for _, c in ipairs(t.contributions) do
    if c.key ~= '' then
      local seen = redis.call('HGET', keys, c.key)
      if seen and seen ~= c.digest then
        return {'conflict', tostring(i - 1), c.key}
      end
    end
  end
end
local out = {'ok', '0', '0'}
local counted, repeated = 0, 0
for _, t in ipairs(req.tables) do
  local tab = prefix .. t.id
  local keys = tab .. ':keys'
  for _, c in ipairs(t.contributions) do
    if c.key == '' or redis.call('HSETNX', keys, c.key, c.digest) == 1 then
      counted = counted + 1
      for _, row in ipairs(c.rows) do
        for _, s in ipairs(row[1]) do
          redis.call('HINCRBY', tab, 'c:' .. s, 1)
          local sum = tonumber(redis.call('HGET', tab, 's:' .. s) or '0') + row[2]
          redis.call('HSET', tab, 's:' .. s, string.format('%.17g', sum))
        end
      end
    else
      repeated = repeated + 1
    end
  end
  for _, s in ipairs(t.reads) do
    local got = redis.call('HMGET', tab, 'c:' .. s, 's:' .. s)
    out[#out + 1] = got[1] or '0'
    out[#out + 1] = got[2] or '0'
  end
  if req.ttl > 0 then
    redis.call('EXPIRE', tab, req.ttl)
    redis.call('EXPIRE', keys, req.ttl)
  end
  redis.call('ZADD', prefix .. 'index', req.now, t.id)
end
if req.ttl > 0 then
  redis.call('ZREMRANGEBYSCORE', prefix .. 'index', '-inf', req.now - req.ttl)
end
local extra = redis.call('ZCARD', prefix .. 'index') - req.max_tables
if extra > 0 then
  local old = redis.call('ZPOPMIN', prefix .. 'index', extra)
  for k = 1, #old, 2 do
    redis.call('DEL', prefix .. old[k], prefix .. old[k] .. ':keys')
  end
end
out[2] = tostring(counted)
out[3] = tostring(repeated)
return out
"""


def redacted(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisNumcaStore:
    """Tables in one Redis (``redis://[:password@]host:port/db``), shared by every replica.

    Keys start with ``prefix``: a table's counts and sums (a hash), its idempotency keys
    (a hash, ``<table>:keys``) and an index of tables by last use (a sorted set) that bounds
    them to ``max_prompts``. ``ttl_s`` > 0 expires a table unused that long. Durability is
    Redis's own (AOF or RDB persistence). Needs one Redis, not a Redis Cluster: a call
    touches several tables at once.
    """

    def __init__(
        self,
        url: str,
        max_prompts: int = 100_000,
        ttl_s: float = 0.0,
        prefix: str = "statevalue:numca:",
        timeout_s: float = 5.0,
    ) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - redis is a dependency
            raise RuntimeError("the Redis Numca store needs the redis package") from exc
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
        )
        self._url = redacted(url)
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._script = self._client.register_script(_ADD_AND_READ)
        self._max_prompts = max_prompts
        self._ttl_s = ttl_s
        self._prefix = prefix
        self._lock = threading.Lock()
        self._counted = self._repeated = 0

    def ping(self) -> bool:
        """Whether Redis answers now."""
        try:
            return bool(self._client.ping())
        except self._errors:
            return False

    def add_and_read(self, updates: Sequence[TableUpdate]) -> list[dict[str, Stats]]:
        payload = {
            "prefix": self._prefix,
            "now": time.time(),
            "ttl": int(self._ttl_s + 0.999) if self._ttl_s > 0 else 0,
            "max_tables": self._max_prompts,
            "tables": [
                {
                    "id": u.table,
                    "contributions": [
                        {
                            "key": c.key,
                            "digest": c.digest,
                            "rows": [[list(states), reward] for states, reward in c.rows],
                        }
                        for c in u.contributions
                    ],
                    "reads": list(u.reads),
                }
                for u in updates
            ],
        }
        try:
            reply = self._script(args=[json.dumps(payload)])
        except self._errors as exc:
            raise StoreUnavailable(
                f"the Numca store {self._url} is unavailable ({exc}); nothing was counted "
                "that a retry would count again"
            ) from exc
        words = [w.decode() if isinstance(w, bytes) else str(w) for w in reply]
        if words[0] == "conflict":
            raise ContributionConflict(updates[int(words[1])].table, words[2])
        with self._lock:
            self._counted += int(words[1])
            self._repeated += int(words[2])
        values = iter(words[3:])
        return [
            {
                state: (count, float(total))
                for state, count, total in ((s, int(next(values)), next(values)) for s in u.reads)
                if count
            }
            for u in updates
        ]

    def stats(self) -> StoreStats:
        try:
            tables = int(self._client.zcard(self._prefix + "index"))
            memory: Mapping[str, Any] = self._client.info("memory")
            used = int(memory["used_memory"])
        except self._errors:
            return StoreStats(None, None, self._counted, self._repeated)
        return StoreStats(tables, used, self._counted, self._repeated)

    def describe(self) -> str:
        return self._url

    def close(self) -> None:
        self._client.close()


def open_numca_store(
    where: str, max_prompts: int, ttl_s: float = 0.0, snapshot: Path | None = None
) -> NumcaStore:
    """The store a ``--numca-store`` value names: ``memory`` or a ``redis://`` URL."""
    if where == "memory":
        return InMemoryNumcaStore(max_prompts, ttl_s, snapshot)
    if where.startswith(("redis://", "rediss://", "unix://")):
        if snapshot is not None:
            raise ValueError("numca_snapshot is for the memory store; Redis persists itself")
        store = RedisNumcaStore(where, max_prompts, ttl_s)
        if not store.ping():
            log.warning(
                "Redis at %s does not answer yet: requests with a prompt_id get 503 / "
                "UNAVAILABLE until it does",
                store.describe(),
            )
        return store
    raise ValueError(f"numca_store must be 'memory' or a redis:// URL, not {redacted(where)!r}")
