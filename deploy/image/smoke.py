"""Smoke test of a statevalue image, run with buildah (no container daemon needed).

Reports the image's torch and checks that `statevalue serve --help` answers. Then serves
from the image on free loopback ports and checks: /readyz turns 200, one HTTP and
one gRPC estimate (the gRPC one from a second container of the same image, with the image's
own client), /v1/model names the device asked for, /metrics counts both estimates, the
server runs as the image's non-root user, and SIGTERM ends it with exit status 0 within the
drain grace. Prints what it measured; any failed check exits non-zero.

    python deploy/image/smoke.py statevalue:0.1.0-cpu
    python deploy/image/smoke.py statevalue:0.1.0-cuda --device cpu \\
        --volume <a .gguf file>:/models/model.gguf --model /models/model.gguf

Standard library only: it runs with any Python 3.11 on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# "What is 2 + 3?" and two answers, " It is 5." and " 6.", in the embedded model's tokens.
PROMPT = [1780, 314, 216, 34, 1232, 216, 35, 47]
RESPONSES = [([657, 314, 216, 37, 30], 1.0), ([216, 38, 30], 0.0)]
GRACE_S = 20.0
GRPC_CLIENT = """
import json, sys
from statevalue_client import Group, Rollout, ValueClient
prompt, responses = json.loads(sys.argv[1])
with ValueClient(sys.argv[2], retries=0) as client:
    result = client.estimate([Group(prompt, [Rollout(ids, reward) for ids, reward in responses])])
print(json.dumps({"model": result.model.name,
                  "hista": [r.values["hista"].tolist() for r in result.groups[0].rollouts]}))
"""


class SmokeFailed(Exception):
    """A check did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailed(message)


def buildah(*args: str) -> str:
    return subprocess.run(
        ["buildah", *args], check=True, capture_output=True, text=True, timeout=600
    ).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def server_process(runner: int) -> int:
    """The ``statevalue serve`` process that ``buildah run`` (pid ``runner``) started."""
    for pid in descendants(runner):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # Not buildah's own helper (buildah-chroot-exec statevalue serve ...) above it.
        helper = argv[0].startswith(b"buildah")
        if not helper and any(a.endswith(b"statevalue") for a in argv) and b"serve" in argv:
            return pid
    raise SmokeFailed("no statevalue serve process under buildah run")


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus' text format (0 when absent)."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") and all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return 0.0


def smoke(
    image: str,
    device: str,
    model: str | None,
    volumes: list[str],
    imports: list[str],
    ready_timeout: float,
) -> list[tuple]:
    report: list[tuple] = [
        ("image", image),
        ("size", buildah("images", "--format", "{{.Size}}", image).splitlines()[0]),
    ]
    config = json.loads(buildah("inspect", "--type", "image", image))["Docker"]["config"]
    user, entrypoint = config.get("User", ""), config.get("Entrypoint") or []
    check(user not in ("", "0", "root"), f"the image runs as {user or 'root'}")
    http_port, grpc_port = free_port(), free_port()
    mounts = [a for v in volumes for a in ("--volume", f"{v}:ro")]
    server = buildah("from", "--pull-never", image)
    client = buildah("from", "--pull-never", image)
    log = tempfile.TemporaryFile()
    runner = None
    try:
        run = ["run", "--isolation", "chroot", client, "--"]
        torch = buildah(
            *run, "python", "-c", "import torch; print(torch.__version__, torch.version.cuda)"
        )
        version, cuda = torch.split()
        report.append(("torch", version + ("" if cuda == "None" else f", CUDA {cuda}")))
        for module in imports:
            version = buildah(*run, "python", "-c", f"import {module}; print({module}.__version__)")
            report.append((f"import {module}", version.splitlines()[-1]))
        usage = buildah(*run, *entrypoint, "--help")
        check("--model" in usage and "--device" in usage, f"serve --help: {usage[:300]}")
        report.append(("serve --help", "answers"))
        serve = [*entrypoint, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                 "--device", device, "--shutdown-grace-s", str(GRACE_S),
                 *(["--model", model] if model else [])]  # fmt: skip
        started = time.monotonic()
        runner = subprocess.Popen(
            ["buildah", "run", "--isolation", "chroot", *mounts, server, "--", *serve],
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own process group, so that buildah's helpers and the server under them
            # all go when the test ends, however it ends.
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{http_port}"
        while http(base + "/readyz")[0] != 200:
            check(runner.poll() is None, f"the server exited ({runner.returncode}) before ready")
            check(time.monotonic() - started < ready_timeout, f"not ready in {ready_timeout} s")
            time.sleep(0.5)
        report.append(("ready after", f"{time.monotonic() - started:.0f} s"))

        pid = server_process(runner.pid)
        uid = uid_of(pid)
        image_uid = buildah(*run, "id", "-u")
        check(uid != 0 and str(uid) == image_uid, f"server uid {uid}, image user {image_uid}")
        report.append(("server user", f"{user} (uid {uid})"))

        status, body = http(base + "/v1/model")
        check(status == 200, f"/v1/model: {status} {body[:200]!r}")
        model = json.loads(body)
        check(model["device"] == device, f"/v1/model device {model['device']}, not {device}")

        sent = [{"response_ids": ids, "reward": reward} for ids, reward in RESPONSES]
        group = {"group_id": "g1", "prompt_ids": PROMPT, "rollouts": sent}
        status, body = http(
            base + "/v1/estimate", {"methods": ["hista", "numca"], "groups": [group]}
        )
        check(status == 200, f"HTTP estimate: {status} {body[:300]!r}")
        rollouts = json.loads(body)["groups"][0]["rollouts"]
        lengths = [len(r["values"]["hista"]) for r in rollouts]
        check(lengths == [len(ids) for ids, _ in RESPONSES], f"HTTP estimate lengths {lengths}")
        report.append(("HTTP estimate", f"200, {model['name']} on {model['device']}"))

        answer = subprocess.run(
            ["buildah", *run, "python", "-c", GRPC_CLIENT, json.dumps([PROMPT, RESPONSES]),
             f"127.0.0.1:{grpc_port}"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        check(answer.returncode == 0, f"gRPC estimate failed: {answer.stderr[-2000:]}")
        grpc_answer = json.loads(answer.stdout.strip().splitlines()[-1])
        http_hista = [r["values"]["hista"] for r in rollouts]
        check(
            [len(v) for v in grpc_answer["hista"]] == lengths
            and all(
                abs(a - b) < 1e-5
                for g, h in zip(grpc_answer["hista"], http_hista, strict=True)
                for a, b in zip(g, h, strict=True)
            ),
            f"gRPC Hista values {grpc_answer['hista']}, HTTP's {http_hista}",
        )
        report.append(("gRPC estimate", f"OK, {grpc_answer['model']}, the same Hista values"))

        status, body = http(base + "/metrics")
        check(status == 200, f"/metrics: {status}")
        text = body.decode()
        requests = "statevalue_requests_total"
        served = {
            "http": metric(text, requests, frontend="http", rpc="estimate", status="200"),
            "grpc": metric(text, requests, frontend="grpc", rpc="Estimate", status="OK"),
        }
        check(all(v >= 1 for v in served.values()), f"/metrics counts {served}")
        report.append(
            ("/metrics", f"estimates counted: http {served['http']:.0f}, grpc {served['grpc']:.0f}")
        )

        stopping = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        try:
            code = runner.wait(timeout=GRACE_S + 10)
        except subprocess.TimeoutExpired:
            raise SmokeFailed(f"still running {GRACE_S + 10:.0f} s after SIGTERM") from None
        took = time.monotonic() - stopping
        check(code == 0, f"exit status {code} after SIGTERM")
        check(took <= GRACE_S, f"SIGTERM: exited after {took:.1f} s, grace {GRACE_S} s")
        report.append(("SIGTERM", f"exit 0 after {took:.1f} s (grace {GRACE_S:.0f} s)"))
        return report
    except SmokeFailed:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace")[-6000:])
        raise
    finally:
        if runner is not None:
            try:
                os.killpg(runner.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            runner.wait()
        for container in (server, client):
            subprocess.run(["buildah", "rm", container], capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image")
    parser.add_argument("--device", default="cpu", help="statevalue serve --device")
    parser.add_argument("--model", help="statevalue serve --model (default: the image's)")
    parser.add_argument("--volume", action="append", default=[], help="HOST:CONTAINER, read-only")
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], help="a module the image has"
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds")
    args = parser.parse_args()
    try:
        report = smoke(
            args.image, args.device, args.model, args.volume, args.imports, args.ready_timeout
        )
    except SmokeFailed as failure:
        sys.exit(f"smoke test of {args.image} FAILED: {failure}")
    width = max(len(name) for name, _ in report)
    for name, value in report:
        print(f"{name:<{width}}  {value}")
    print(f"smoke test of {args.image} passed")


if __name__ == "__main__":
    main()
