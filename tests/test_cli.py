"""The offline CLI on the shipped example file and the real embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue.cli import build_parser, main, parse_params

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


def test_bad_input_line_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        EXAMPLE.read_text().splitlines()[0] + "\n" + '{"rollouts": [], "prompt_ids": [1]}\n'
    )
    done = _run("estimate", "--input", str(bad), "--quiet", "--methods", "group_mean")
    assert done.returncode == 2
    assert "bad.jsonl:2: rollouts: empty group" in done.stderr


def test_unknown_method_is_rejected() -> None:
    done = _run("estimate", "--input", str(EXAMPLE), "--methods", "numca,critic")
    assert done.returncode == 2
    assert "unknown method 'critic'" in done.stderr


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
