"""The last Estimate requests the server answered, kept for the debug page.

Opt-in (``--debug-history N``): a ring buffer of the N most recent answered requests from
either front end, each with its result (explanations included), so that ``/ui`` can show
what a trainer actually sent. Never the caller's credentials: only the request body.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass

from statevalue.schema import EstimateRequest, EstimateResult


@dataclass(frozen=True)
class HistoryEntry:
    """One answered request: its id in this process, when it was answered, what it was."""

    id: int
    time: float
    request: EstimateRequest
    result: EstimateResult


class DebugHistory:
    """The ``size`` most recent answered requests; the oldest is dropped first.

    Used from the server's event loop only, so it needs no lock.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a debug history holds at least one request")
        self._entries: deque[HistoryEntry] = deque(maxlen=size)
        self._ids = itertools.count(1)

    def record(self, request: EstimateRequest, result: EstimateResult) -> HistoryEntry:
        """Keep ``request`` and its ``result``, dropping the oldest entry when full."""
        entry = HistoryEntry(next(self._ids), time.time(), request, result)
        self._entries.append(entry)
        return entry

    def entries(self) -> list[HistoryEntry]:
        """Every kept entry, newest first."""
        return list(reversed(self._entries))

    def get(self, entry_id: int) -> HistoryEntry | None:
        """The entry with this id, or None if it was dropped or never kept."""
        return next((e for e in self._entries if e.id == entry_id), None)
