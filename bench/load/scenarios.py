"""The load and fault scenarios of docs/reliability.md, against `statevalue serve` processes.

    python -m bench.load.scenarios             # all of them, about 25 minutes
    python -m bench.load.scenarios --short     # bounded, a few minutes (CI runs it)
    python -m bench.load.scenarios --only capacity,levels

  capacity  closed-loop users (half HTTP, half gRPC) saturate one server: requests/s
  levels    50 / 100 / 200 % of that capacity, paced users: answers by status with
            p50 / p95 / p99 latency (locust, bench/load/locustfile.py)
  soak      70 % for 10 minutes: the server's resident memory at start and end, errors
  sigterm   150 % load, then SIGTERM: every request answered (completed, or a retryable
            503 / UNAVAILABLE), none left hanging, exit code 0
  kill      two replicas behind one ipv4: target, a retrying ValueClient per thread, one
            replica killed with SIGKILL: calls lost

Every request is one group of 4 rollouts x 64 tokens after a 32-token prompt, all three
methods, as in the locustfile. Prints one markdown table per scenario.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import httpx
import numpy as np

from bench.load.mix import (
    METHODS,
    PROMPT_TOKENS,
    RESPONSE_TOKENS,
    ROLLOUTS,
    as_json,
    make_group,
)
from bench.perf import ServerProcess
from statevalue_client import ValueClient

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SCENARIOS = ("capacity", "levels", "soak", "sigterm", "kill")
TOKENS_PER_REQUEST = ROLLOUTS * (PROMPT_TOKENS + RESPONSE_TOKENS)


@dataclass
class Durations:
    capacity_s: int
    level_s: int
    soak_s: int
    sigterm_load_s: int
    kill_s: int
    levels: tuple[float, ...] = (0.5, 1.0, 2.0)
    model: str = "embedded"  # what the servers load: 'embedded' or a model directory


FULL = Durations(capacity_s=90, level_s=180, soak_s=600, sigterm_load_s=40, kill_s=90)
SHORT = Durations(capacity_s=12, level_s=12, soak_s=0, sigterm_load_s=8, kill_s=15, levels=(2.0,))


def start_server(model: str, *flags: str) -> ServerProcess:
    """`statevalue serve` on ``model`` on CPU, ready."""
    return ServerProcess(model, "cpu", "auto", 8192, *flags)


def url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def target(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.grpc_port}"


def rss_mib(server: ServerProcess) -> float:
    """Resident memory of the server process (Linux /proc)."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def stop_server(server: ServerProcess) -> None:
    if server.process.poll() is None:
        server.process.kill()
    server.process.wait(timeout=60)


@dataclass
class LocustRun:
    """One locust run's answers by name ("http 200", "grpc RESOURCE_EXHAUSTED", ...)."""

    seconds: float
    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total(self) -> dict[str, float]:
        return self.rows.get("Aggregated", {})

    def count(self, prefix: str = "") -> int:
        return int(
            sum(r["Request Count"] for n, r in self.rows.items() if n != "Aggregated" and
                n.startswith(prefix))
        )  # fmt: skip

    def ok_per_second(self) -> float:
        return (self.count("http 200") + self.count("grpc OK")) / self.seconds


def locust(
    server: ServerProcess, users: int, seconds: int, rate_per_user: float = 0.0
) -> LocustRun:
    """Run the locustfile headless against ``server``; answers by status name."""
    with tempfile.TemporaryDirectory() as directory:
        prefix = Path(directory) / "run"
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--only-summary",
            "--host", url(server), "--grpc-target", target(server),
            "--rate-per-user", str(rate_per_user), "--csv", str(prefix),
            "--exit-code-on-error", "0", "--stop-timeout", "300",
        ]  # fmt: skip
        started = time.monotonic()
        subprocess.run(command, check=True, capture_output=True, timeout=seconds + 900)
        elapsed = time.monotonic() - started
        with open(f"{prefix}_stats.csv") as stats:
            rows = {row["Name"]: row for row in csv.DictReader(stats)}
    return LocustRun(
        seconds=min(elapsed, seconds),
        rows={
            name: {k: float(v) for k, v in row.items() if k not in ("Type", "Name") and v != "N/A"}
            for name, row in rows.items()
        },
    )


def status_table(run: LocustRun) -> list[str]:
    lines = ["| answer | count | p50 ms | p95 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    for name, row in sorted(run.rows.items()):
        lines.append(
            f"| {name} | {int(row['Request Count'])} | {row.get('50%', 0):.0f} | "
            f"{row.get('95%', 0):.0f} | {row.get('99%', 0):.0f} |"
        )
    return lines


def server_errors(run: LocustRun) -> int:
    """5xx and INTERNAL / UNKNOWN answers (none allowed outside a shutdown)."""
    return sum(
        int(row["Request Count"])
        for name, row in run.rows.items()
        if re.fullmatch(r"http 5\d\d|grpc (INTERNAL|UNKNOWN)", name)
    )


# -- the scenarios -----------------------------------------------------------------------


def capacity(server: ServerProcess, d: Durations, report: list[str]) -> float:
    run = locust(server, users=8, seconds=d.capacity_s)
    rate = run.ok_per_second()
    report += [
        f"### Capacity ({d.capacity_s} s, 8 closed-loop users: 4 HTTP, 4 gRPC)",
        "",
        f"{rate:.2f} requests/s answered OK ({rate * TOKENS_PER_REQUEST:.0f} tokens/s; each "
        f"request is {TOKENS_PER_REQUEST} prompt+response tokens).",
        "",
        *status_table(run),
        "",
    ]
    return rate


def levels(server: ServerProcess, d: Durations, capacity_rps: float, report: list[str]) -> int:
    """Each share in turn on ``server`` (each run ends when its answers are in)."""
    report += ["### Offered load as a share of capacity", ""]
    errors = 0
    # Enough paced users that each one's period (users / rate) exceeds the longest wait
    # admission allows (20 s): the offered load then does not fall with the latency.
    users = max(16, round(30 * max(d.levels) * capacity_rps))
    for share in d.levels:
        run = locust(server, users, d.level_s, rate_per_user=share * capacity_rps / users)
        errors += server_errors(run)
        report += [
            f"**{share:.0%}** ({share * capacity_rps:.2f} requests/s offered by {users} paced "
            f"users for {d.level_s} s): {run.ok_per_second():.2f} requests/s answered OK",
            "",
            *status_table(run),
            "",
        ]
    return errors


def soak(d: Durations, capacity_rps: float, report: list[str]) -> int:
    server = start_server(d.model)
    try:
        locust(server, 4, 20, rate_per_user=0.7 * capacity_rps / 4)  # warm
        before = rss_mib(server)
        run = locust(server, 8, d.soak_s, rate_per_user=0.7 * capacity_rps / 8)
        after = rss_mib(server)
    finally:
        stop_server(server)
    report += [
        f"### Soak: 70 % for {d.soak_s / 60:.0f} minutes",
        "",
        f"Server resident memory {before:.0f} MiB after a 20 s warm-up, {after:.0f} MiB at "
        f"the end ({after - before:+.0f} MiB).",
        "",
        *status_table(run),
        "",
    ]
    return server_errors(run)


@dataclass
class Outcomes:
    """What each closed-loop thread's requests got."""

    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1


def run_threads(workers: Sequence[Callable[[], None]], timeout: float) -> bool:
    """Start the workers; True when all ended within ``timeout``."""
    threads = [threading.Thread(target=w, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


def sigterm(d: Durations, capacity_rps: float, report: list[str]) -> int:
    grace = 30.0
    server = start_server(d.model, "--shutdown-grace-s", str(grace))
    outcomes, done = Outcomes(), threading.Event()
    users = 8
    period = users / (1.5 * capacity_rps)

    def http_user() -> None:
        rng = np.random.default_rng()
        with httpx.Client(timeout=300) as client:
            while not done.is_set():
                started = time.monotonic()
                try:
                    answer = client.post(
                        f"{url(server)}/v1/estimate", json=as_json(make_group(rng))
                    )
                    outcomes.add(f"http {answer.status_code}")
                except httpx.ConnectError:
                    outcomes.add("http not accepted (port closed)")
                    return
                except httpx.TransportError as exc:
                    outcomes.add(f"http broken: {type(exc).__name__}")
                    return
                time.sleep(max(0.0, period - (time.monotonic() - started)))

    def grpc_user() -> None:
        rng = np.random.default_rng()
        with ValueClient(target(server), retries=0, timeout=300) as client:
            while not done.is_set():
                started = time.monotonic()
                try:
                    client.estimate([make_group(rng)], METHODS)
                    outcomes.add("grpc OK")
                except grpc.RpcError as exc:
                    code = exc.code()
                    # After the exit a new call finds no server: not an accepted request.
                    if code == grpc.StatusCode.UNAVAILABLE and server.process.poll() is not None:
                        outcomes.add("grpc not accepted (server gone)")
                        return
                    outcomes.add(f"grpc {code.name}")
                time.sleep(max(0.0, period - (time.monotonic() - started)))

    workers = [http_user] * (users // 2) + [grpc_user] * (users // 2)
    result: dict[str, bool] = {}
    runner = threading.Thread(
        target=lambda: result.setdefault("ended", run_threads(workers, 900)), daemon=True
    )
    runner.start()
    time.sleep(d.sigterm_load_s)
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = server.process.wait(timeout=grace + 60)
    exit_s = time.monotonic() - signalled
    done.set()
    runner.join(120)
    ended = result.get("ended", False)
    stop_server(server)
    hanging = 0 if ended else 1
    bad = sum(
        n
        for what, n in outcomes.counts.items()
        if not re.fullmatch(
            r"http (200|429|503)|grpc (OK|RESOURCE_EXHAUSTED|UNAVAILABLE|CANCELLED)"
            r"|.*not accepted.*",
            what,
        )
    )
    report += [
        f"### SIGTERM under load (150 %, grace {grace:.0f} s, signal after {d.sigterm_load_s} s)",
        "",
        f"Exit code {code} after {exit_s:.1f} s; every client thread ended: {ended}.",
        "",
        "| answer | count |",
        "|---|---:|",
        *(f"| {what} | {n} |" for what, n in sorted(outcomes.counts.items())),
        "",
    ]
    return bad + hanging + (code != 0)


def kill(d: Durations, report: list[str]) -> int:
    with ThreadPoolExecutor(2) as starting:
        replicas = list(starting.map(lambda _: start_server(d.model), range(2)))
    address = "ipv4:" + ",".join(target(r) for r in replicas)
    outcomes, done = Outcomes(), threading.Event()
    served = Counter[str]()

    def user() -> None:
        rng = np.random.default_rng()
        with ValueClient(address, timeout=300) as client:
            while not done.is_set():
                try:
                    client.estimate([make_group(rng)], METHODS)
                    outcomes.add("OK")
                except grpc.RpcError as exc:
                    # A refusal for overload is an answer (back off), not a lost call.
                    code = exc.code()
                    kind = "refused" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else "lost"
                    outcomes.add(f"{kind}: {code.name}: {exc.details()}")

    try:
        runner = threading.Thread(target=run_threads, args=([user] * 2, 900), daemon=True)
        runner.start()
        time.sleep(d.kill_s / 3)
        # Kill while calls are flowing: at least two answered first.
        deadline = time.monotonic() + 120
        while outcomes.counts["OK"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        replicas[0].process.kill()
        killed_at = dict(outcomes.counts)
        time.sleep(2 * d.kill_s / 3)
        done.set()
        runner.join(600)
        served.update(outcomes.counts)
    finally:
        for replica in replicas:
            stop_server(replica)
    lost = sum(n for what, n in served.items() if what.startswith("lost"))
    report += [
        f"### Two replicas, one killed with SIGKILL ({d.kill_s} s, 2 closed-loop threads, "
        "ValueClient with its default retries)",
        "",
        f"Calls answered before the kill: {killed_at.get('OK', 0)}; in all: "
        f"{served.get('OK', 0)}; calls lost: {lost}.",
        "",
        *(f"- {what}: {n}" for what, n in sorted(served.items()) if what != "OK"),
        "",
    ]
    return lost


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="bounded durations (CI)")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated: {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--capacity", type=float, default=0.0, help="requests/s; skips measuring capacity"
    )
    parser.add_argument(
        "--levels", default=None, help="comma-separated shares of capacity (default 0.5,1,2)"
    )
    parser.add_argument(
        "--model", default="embedded", help="'embedded' (default) or a model directory"
    )
    args = parser.parse_args(argv)
    chosen = args.only.split(",")
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    d = replace(SHORT if args.short else FULL, model=args.model)
    if args.levels:
        d = replace(d, levels=tuple(float(share) for share in args.levels.split(",")))
    report = [
        f"# statevalue load scenarios, {datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, model {d.model} on CPU",
        f"# command: python -m bench.load.scenarios {shlex.join(argv or sys.argv[1:])}",
        "",
    ]
    failures = 0
    rate = args.capacity
    needs_rate = not rate and {"levels", "soak", "sigterm"} & set(chosen)
    if "capacity" in chosen or needs_rate or "levels" in chosen:
        server = start_server(d.model)
        try:
            if "capacity" in chosen or needs_rate:
                rate = capacity(server, d, report)
            if "levels" in chosen:
                failures += levels(server, d, rate, report)
        finally:
            stop_server(server)
    if "soak" in chosen and d.soak_s:
        failures += soak(d, rate, report)
    if "sigterm" in chosen:
        failures += sigterm(d, rate, report)
    if "kill" in chosen:
        failures += kill(d, report)
    print("\n".join(report))
    print(f"\nfailures (5xx, lost or hanging requests, a bad exit): {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
