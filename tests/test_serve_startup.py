"""Start-up that fails well: a wrong model or a taken port ends ``statevalue serve`` at
once with one line naming the flag, before any port serves or the model loads."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.servers import free_port, start_serve_process


def finished(log: Path, *flags: str, ports: tuple[int, int] | None = None) -> tuple[int, str]:
    """Exit status and output of a ``statevalue serve`` that must end by itself."""
    process, *_ = start_serve_process(log, *flags, ports=ports)
    try:
        return process.wait(timeout=120), log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


def error_line(output: str) -> str:
    """The error line, checked to be the output's last and the only trace of the failure."""
    assert "Traceback" not in output, output
    last = output.rstrip("\n").splitlines()[-1]
    assert last.startswith("statevalue: error: "), output
    return last.removeprefix("statevalue: error: ")


def test_a_wrong_model_path_is_named_before_anything_starts(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-policy"
    status, output = finished(tmp_path / "serve.log", "--model", str(missing))
    assert status == 2
    line = error_line(output)
    assert line.startswith(f"--model: {missing}: no such file or directory; expected ")
    assert "config.json" in line and ".gguf" in line
    assert "listening" not in output and "loading model" not in output


def test_a_taken_port_is_named_with_its_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, ports in (("--http-port", (free_port(), port)), ("--grpc-port", (port, 0))):
            status, output = finished(tmp_path / f"serve{flag}.log", ports=ports)
            assert status == 2, output
            line = error_line(output)
            assert (
                line == f"{flag} {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"
            )
            assert "listening" not in output and "loading model" not in output
