"""Where Numca tables live between requests that share a ``prompt_id``."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol

from statevalue.estimators.numca import NumcaTable


class NumcaStore(Protocol):
    """Keeps one NumcaTable per key; callers hold ``lock`` while they update and read."""

    lock: threading.Lock

    def table(self, key: Hashable) -> NumcaTable:
        """The table for ``key``, created empty on first use."""
        ...

    def __len__(self) -> int: ...


class InMemoryNumcaStore:
    """An in-process store that forgets the least recently used prompt past ``max_prompts``."""

    def __init__(self, max_prompts: int = 100_000) -> None:
        self.lock = threading.Lock()
        self._max_prompts = max_prompts
        self._tables: OrderedDict[Hashable, NumcaTable] = OrderedDict()

    def table(self, key: Hashable) -> NumcaTable:
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = NumcaTable()
            while len(self._tables) > self._max_prompts:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def __len__(self) -> int:
        return len(self._tables)
