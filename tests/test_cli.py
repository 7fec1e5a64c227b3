"""The offline CLI on the shipped example file and the real embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue.cli import (
    build_parser,
    main,
    parse_command_line,
    parse_params,
    run_serve,
    settings_from_args,
)
from statevalue.settings import ModelSettings, ServerSettings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "groups.jsonl"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statevalue.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_estimate_round_trips_example_file(tmp_path: Path, backend: TorchBackend) -> None:
    # The suite's one load of the GGUF file itself (the default model): every other test
    # loads its exported checkpoint, which must answer the same.
    output = tmp_path / "values.jsonl"
    done = _run("estimate", "--input", str(EXAMPLE), "--output", str(output), "--quiet")
    assert done.returncode == 0, done.stderr
    inputs = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    outputs = [json.loads(line) for line in output.read_text().splitlines()]
    exported = tmp_path / "exported.jsonl"
    assert (
        main(["estimate", "--input", str(EXAMPLE), "--output", str(exported)], backend=backend) == 0
    )
    from_checkpoint = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [o["group_id"] for o in outputs] == [i["group_id"] for i in inputs]
    for group_in, group_out, group_exported in zip(inputs, outputs, from_checkpoint, strict=True):
        assert group_out["model"]["name"] == "SmolLM2-135M-Instruct"
        assert group_out["model"]["version"].startswith("q4_1-")
        for rollout_out, rollout_exported in zip(
            group_out["rollouts"], group_exported["rollouts"], strict=True
        ):
            for method, values in rollout_out["values"].items():
                np.testing.assert_allclose(
                    values, rollout_exported["values"][method], rtol=1e-5, atol=1e-6
                )
        assert len(group_out["rollouts"]) == len(group_in["rollouts"])
        for rollout_in, rollout_out in zip(
            group_in["rollouts"], group_out["rollouts"], strict=True
        ):
            if "response_ids" in rollout_in:
                length = len(rollout_in["response_ids"])
                for method in ("numca", "hista", "group_mean"):
                    assert len(rollout_out["values"][method]) == length
                    assert len(rollout_out["advantages"][method]) == length
    assert "forward" in done.stderr and "estimators" in done.stderr


def test_bad_input_line_is_named(
    tmp_path: Path, backend: TorchBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        EXAMPLE.read_text().splitlines()[0] + "\n" + '{"rollouts": [], "prompt_ids": [1]}\n'
    )
    command = ["estimate", "--input", str(bad), "--quiet", "--methods", "group_mean"]
    assert main(command, backend=backend) == 2
    assert "bad.jsonl:2: rollouts: empty group" in capsys.readouterr().err


def test_unknown_method_is_rejected(
    backend: TorchBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["estimate", "--input", str(EXAMPLE), "--methods", "numca,critic"], backend=backend)
        == 2
    )
    assert "unknown method 'critic'" in capsys.readouterr().err


def test_parse_params() -> None:
    config = parse_params(
        ["hista.d_min=2.5", "numca.number_pattern=decimal", "advantage.scale=none"]
    )
    assert config.hista.d_min == 2.5
    assert config.numca.number_pattern == "decimal"
    assert config.advantage.scale == "none"
    with pytest.raises(ValueError, match="hista.bogus"):
        parse_params(["hista.bogus=1"])
    with pytest.raises(ValueError, match="SECTION.FIELD=VALUE"):
        parse_params(["d_min=1"])


def test_help_explains_input_format() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["estimate"].format_help()  # type: ignore[union-attr]
    assert '"response_ids"' in text and "values[t] = V(prompt + response[:t])" in text


def serve_settings(*argv: str) -> ServerSettings:
    """The settings ``statevalue serve ARGV`` runs with, parsed as :func:`main` parses them."""
    args = parse_command_line(["serve", *argv])
    assert args.handler is run_serve
    return settings_from_args(ServerSettings, args)


def test_every_serve_flag_reaches_the_settings(tmp_path: Path) -> None:
    model = tmp_path / "policy"
    model.mkdir()
    (model / "config.json").write_text("{}")
    params = tmp_path / "params.json"
    params.write_text('{"hista": {"d_min": 2.5}}')
    token = tmp_path / "token"
    token.write_text("from-a-file\n")
    pem = tmp_path / "cert.pem"
    # Each flag (with any flag it needs), and the value the settings must hold.
    flags: dict[str, tuple[list[str], object]] = {
        "backend": (["--backend", "vllm"], "vllm"),
        "model": (["--model", str(model)], str(model)),
        "device": (["--device", "cuda:1"], "cuda:1"),
        "dtype": (["--dtype", "bfloat16"], "bfloat16"),
        "layer": (["--layer", "-3"], -3),
        "forward_path": (["--forward-path", "packed"], "packed"),
        "max_batch_tokens": (["--max-batch-tokens", "1234"], 1234),
        "vllm_memory_share": (["--vllm-memory-share", "0.4"], 0.4),
        "vllm_enforce_eager": (["--no-vllm-enforce-eager"], False),
        "params_file": (["--params", str(params)], params),
        "host": (["--host", "0.0.0.0"], "0.0.0.0"),
        "http_port": (["--http-port", "8123"], 8123),
        "grpc_port": (["--grpc-port", "50123"], 50123),
        "micro_batch_seconds": (["--micro-batch-seconds", "0.5"], 0.5),
        "max_wait_ms": (["--max-wait-ms", "2.5"], 2.5),
        "max_queue_requests": (["--max-queue-requests", "7"], 7),
        "max_queue_tokens": (["--max-queue-tokens", "70000"], 70000),
        "max_queue_wait_s": (["--max-queue-wait-s", "3"], 3.0),
        "max_groups_per_request": (["--max-groups-per-request", "9"], 9),
        "max_request_tokens": (["--max-request-tokens", "4096"], 4096),
        "max_message_mb": (["--max-message-mb", "16"], 16),
        "max_connection_age_s": (["--max-connection-age-s", "60"], 60.0),
        "numca_store": (["--numca-store", "redis://127.0.0.1:6379/2"], "redis://127.0.0.1:6379/2"),
        "numca_max_prompts": (["--numca-max-prompts", "10"], 10),
        "numca_ttl_s": (["--numca-ttl-s", "30"], 30.0),
        "numca_snapshot": (["--numca-snapshot", str(tmp_path / "s.json")], tmp_path / "s.json"),
        "shutdown_grace_s": (["--shutdown-grace-s", "4"], 4.0),
        "liveness_stall_s": (["--liveness-stall-s", "50"], 50.0),
        "warmup": (["--no-warmup"], False),
        "log_json": (["--log-json"], True),
        "debug_history": (["--debug-history", "5"], 5),
        "admin_token": (["--admin-token", "adm"], "adm"),
        "admin_token_file": (["--admin-token-file", str(token)], token),
        "api_token": (["--api-token", "api"], "api"),
        "api_token_file": (["--api-token-file", str(token)], token),
        "tls_cert": (["--tls-cert", str(pem), "--tls-key", str(pem)], pem),
        "tls_key": (["--tls-cert", str(pem), "--tls-key", str(pem)], pem),
        "tls_client_ca": (
            ["--tls-cert", str(pem), "--tls-key", str(pem), "--tls-client-ca", str(pem)],
            pem,
        ),
    }
    assert set(flags) == set(ServerSettings.model_fields), "give each setting's flag a case"
    defaults = ServerSettings()
    for name, (argv, expected) in flags.items():
        settings = serve_settings(*argv)
        value = getattr(settings, name)
        if name in ("admin_token", "api_token"):
            value = settings.secret(name)
        assert value == expected, (name, argv)
        given = {n for n in flags if any(a in flags[n][0][:1] for a in argv)}
        for other in set(ServerSettings.model_fields) - given - {"admin_token", "api_token"}:
            assert getattr(settings, other) == getattr(defaults, other), (argv, other)
    assert serve_settings("--admin-token-file", str(token)).secret("admin_token") == "from-a-file"


def test_a_flag_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATEVALUE_BACKEND", "vllm")
    monkeypatch.setenv("STATEVALUE_HTTP_PORT", "8111")
    assert (serve_settings().backend, serve_settings().http_port) == ("vllm", 8111)
    assert serve_settings("--backend", "torch").backend == "torch"


def test_bad_serve_flags_are_named_in_one_line(tmp_path: Path) -> None:
    gguf = tmp_path / "policy.gguf"
    gguf.write_bytes(b"GGUF")
    cases = {
        "--backend: Input should be 'torch', 'vllm' or 'none', not 'bogus'": ["--backend", "bogus"],
        "--device: must be auto, cpu, cuda or cuda:N, not 'bogus'": ["--device", "bogus"],
        "--dtype: Input should be": ["--dtype", "bogus"],
        "--http-port: Input should be a valid integer": ["--http-port", "eighty"],
        f"--model: {gguf}: the vllm backend loads a model directory": [
            "--backend", "vllm", "--model", str(gguf),
        ],
    }  # fmt: skip
    for line, argv in cases.items():
        with pytest.raises(ValueError) as caught:
            serve_settings(*argv)
        assert str(caught.value).startswith(line), (argv, str(caught.value))
        assert "\n" not in str(caught.value)


def test_estimate_and_calibrate_take_the_model_flags_of_serve() -> None:
    for command in (["estimate"], ["calibrate", "--reward", "m:f"]):
        args = parse_command_line([*command, "--input", "x", "--dtype", "x"])
        with pytest.raises(ValueError, match="--dtype: Input should be"):
            settings_from_args(ModelSettings, args)
    args = parse_command_line(["estimate", "--input", "x", "--backend", "vllm"])
    assert settings_from_args(ModelSettings, args).backend == "vllm"
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name in ServerSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"STATEVALUE_{name.upper()}" in help_text.replace("\n", "").replace(" ", "")


def test_backend_none_takes_a_tokenizer_directory(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    settings = serve_settings("--backend", "none", "--model", str(tokenizer))
    assert (settings.backend, settings.model) == ("none", str(tokenizer))
    with pytest.raises(ValueError, match=f"--model: {tokenizer}: a directory without a config"):
        serve_settings("--model", str(tokenizer))
