"""The work file of a calibration run: each finished state's continuation rewards, so an
interrupted run resumes where it stopped."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from statevalue.calibration.monte_carlo import State


class WorkFile:
    """JSON lines: a header with the run's settings, then one line per finished state.

    A rerun with the same settings skips the states already there; other settings (another
    model, K, temperature, ...) would mix incomparable targets, so they are refused.
    """

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = settings
        self.done: dict[tuple[str, int, int], list[float]] = {}
        if path.exists() and path.stat().st_size:
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings}) + "\n")

    def _read(self) -> None:
        text = self.path.read_text()
        lines = text.splitlines()
        try:
            header = json.loads(lines[0])["settings"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"work file {self.path}: not a calibration work file") from exc
        differ = [name for name in self.settings if header.get(name) != self.settings[name]]
        if differ:
            shown = ", ".join(
                f"{name} {header.get(name)!r} there, {self.settings[name]!r} now" for name in differ
            )
            raise ValueError(
                f"work file {self.path} was made with other settings ({shown}); "
                "rerun with those, or give another --work file"
            )
        for line in lines[1:]:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run: that state runs again
            self.done[(item["group"], item["response"], item["t"])] = item["rewards"]
        if not text.endswith("\n"):
            # The next record starts on a line of its own, after the cut one.
            with self.path.open("a") as handle:
                handle.write("\n")

    def add(self, state: State, rewards: Sequence[float], lengths: Sequence[int]) -> None:
        """Record a finished state (flushed at once, so an interruption loses at most it)."""
        item = {
            "group": state.key,
            "response": state.response,
            "t": state.t,
            "rewards": [float(r) for r in rewards],
            "lengths": [int(n) for n in lengths],
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(item) + "\n")
        self.done[state.work_key] = item["rewards"]
