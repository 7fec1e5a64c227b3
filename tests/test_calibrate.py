"""``statevalue calibrate``, params files, and the defaults they give a server."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from statevalue.backends.torch_backend import TorchBackend
from statevalue.calibration import (
    State,
    WorkFile,
    candidates,
    clustered_mean,
    load_reward,
    paired_difference,
    sample_states,
)
from statevalue.cli import build_parser, main
from statevalue.config import (
    EstimatorConfig,
    HistaConfig,
    changed_fields,
    load_params,
    with_defaults,
)
from statevalue.engine import Engine, PreparedGroup
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput
from statevalue.settings import ServerSettings
from statevalue_client import ValueClient
from tests.servers import ServerThread, running_server

PARAMS = {"numca": {"merge_distance": 10}, "hista": {"node_spacing": 10, "k_max": 8}}


def has_digit(prompt: str, response: str) -> float:
    """The reward of the end-to-end test: 1 when the response writes a digit."""
    return float(any(c.isdigit() for c in response))


# -- statistics ---------------------------------------------------------------------------


def test_paired_difference_and_its_clustered_se_by_hand() -> None:
    errors = np.array([0.5, 0.3, 0.2, 0.0])
    base = np.full(4, 0.4)
    clusters = ["p", "p", "q", "r"]
    mean, se = paired_difference(errors, base, clusters)
    # Differences 0.1, −0.1, −0.2, −0.4: mean −0.15. Cluster sums 0.0 (2 states), −0.2,
    # −0.4; residuals from n_g·mean: 0.3, −0.05, −0.25.
    assert mean == pytest.approx(-0.15)
    assert se == pytest.approx(math.sqrt(3 / 2 * (0.3**2 + 0.05**2 + 0.25**2)) / 4)
    # Clustering matters: the same differences as four independent states give another SE.
    _, independent = paired_difference(errors, base, ["a", "b", "c", "d"])
    assert independent != pytest.approx(se)
    assert math.isnan(clustered_mean(errors, ["p"] * 4)[1])


# -- params files and how they merge ------------------------------------------------------


def test_request_params_override_the_file_field_by_field() -> None:
    defaults = EstimatorConfig.model_validate(PARAMS)
    merged = with_defaults(EstimatorConfig.model_validate({"hista": {"k_max": 12}}), defaults)
    assert (merged.hista.node_spacing, merged.hista.k_max) == (10, 12)
    assert merged.numca.merge_distance == 10
    assert merged.advantage == EstimatorConfig().advantage
    assert with_defaults(EstimatorConfig(), EstimatorConfig()) == EstimatorConfig()


def test_hista_clamp_is_one_choice() -> None:
    absolute = EstimatorConfig.model_validate({"hista": {"d_min": 2.0}})
    relative = EstimatorConfig.model_validate({"hista": {"relative_d_min": 0.1}})
    # The request's clamp replaces the file's, whichever kind either is.
    assert with_defaults(relative, absolute).hista.relative_d_min == 0.1
    merged = with_defaults(absolute, relative)
    assert (merged.hista.d_min, merged.hista.relative_d_min) == (2.0, 0.0)
    # A file's clamp stays when the request sets none.
    assert with_defaults(EstimatorConfig(), absolute).hista.d_min == 2.0


def test_an_invalid_combination_is_an_error() -> None:
    defaults = EstimatorConfig.model_validate({"hista": {"k_max": 8}})
    with pytest.raises(ValidationError, match="k_min"):
        with_defaults(EstimatorConfig.model_validate({"hista": {"k_min": 10}}), defaults)


def test_changed_fields_load_back() -> None:
    for config in (
        EstimatorConfig(),
        EstimatorConfig(hista=HistaConfig.reference()),
        EstimatorConfig.model_validate(PARAMS),
        EstimatorConfig.model_validate({"hista": {"relative_d_min": 0.05}}),
    ):
        assert EstimatorConfig.model_validate(changed_fields(config)) == config
    assert changed_fields(EstimatorConfig()) == {}


def test_bad_params_file_is_named_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hista": {"node_spacing": 0}}))
    with pytest.raises(ValueError, match=r"bad\.json: hista\.node_spacing"):
        load_params(bad)
    with pytest.raises(ValidationError, match=r"bad\.json: hista\.node_spacing"):
        ServerSettings(params_file=bad)
    bad.write_text(json.dumps({"hista": {"nodes": 5}}))
    assert main(["serve", "--params", str(bad)]) == 2
    assert "bad.json: hista.nodes: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["serve", "--params", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_serve_and_estimate_take_a_params_file() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "--params", "p.json"]).params_file == "p.json"
    assert parser.parse_args(["serve", "--params-file", "p.json"]).params_file == "p.json"
    args = parser.parse_args(["estimate", "--input", "x", "--params", "p.json"])
    assert args.params == Path("p.json")


def test_reward_function_is_imported_by_name() -> None:
    assert load_reward("tests.test_calibrate:has_digit") is has_digit
    for spec, message in (
        ("has_digit", "module:function"),
        ("no_such_module_here:f", "cannot import"),
        ("tests.test_calibrate:PARAMS", "no function 'PARAMS'"),
    ):
        with pytest.raises(ValueError, match=message):
            load_reward(spec)


# -- states and the work file -------------------------------------------------------------


def _group(lengths: list[int], rewarded: list[bool]) -> PreparedGroup:
    return PreparedGroup(
        group_id="g",
        prompt_id=None,
        prompt_ids=np.arange(1, 4, dtype=np.int32),
        responses=[np.arange(n, dtype=np.int32) + 5 for n in lengths],
        rewards=np.ones(len(lengths)),
        rewarded=np.array(rewarded),
        token_rewards=[None] * len(lengths),
    )


def test_states_are_seeded_and_valid() -> None:
    group = _group([1, 5, 9, 7], [True, True, True, False])
    states = sample_states(group, 0, "key", 5, seed=3)
    # Only rewarded responses of two or more tokens: 1 and 2.
    assert sorted(s.response for s in states) == [1, 2]
    assert all(0 < s.t < len(group.responses[s.response]) for s in states)
    assert sample_states(group, 0, "key", 5, seed=3) == states
    assert len(sample_states(group, 0, "key", 1, seed=3)) == 1


def test_work_file_resumes_and_refuses_other_settings(tmp_path: Path) -> None:
    path = tmp_path / "work.jsonl"
    settings = {"model": "m 1", "samples": 2}
    work = WorkFile(path, settings)
    state = State(0, "key", 1, 2, 7)
    work.add(state, [1.0, 0.0], [3, 4])
    with path.open("a") as handle:
        handle.write('{"group": "key", "resp')  # cut by an interruption
    again = WorkFile(path, settings)
    assert again.done == {("key", 1, 2): [1.0, 0.0]}
    again.add(State(0, "key", 2, 1, 8), [1.0, 1.0], [2, 2])
    assert len(WorkFile(path, settings).done) == 2
    with pytest.raises(ValueError, match="samples 2 there, 4 now"):
        WorkFile(path, {**settings, "samples": 4})


def test_grid_lists_defaults_and_reference_once() -> None:
    rows = candidates()
    labels = [row.label for row in rows]
    assert len(labels) == len(set(labels))
    assert labels[:2] == ["group mean", "numca default"]
    assert "numca relative_merge_distance=0.0 (reference)" in labels
    assert "hista default" in labels
    assert (
        "hista relative_node_spacing=0.0, relative_d_min=0.0, neighbours=top_k (reference)"
        in labels
    )
    # Length-relative settings (the defaults' kind) and fixed lengths are both searched.
    assert "hista relative_node_spacing=0.125" in labels
    assert "numca number_pattern=decimal, merge_distance=0, relative_merge_distance=0.0" in labels
    assert len({(row.method, row.config) for row in rows}) == len(rows)


# -- end to end on the embedded model -----------------------------------------------------


def _groups_file(path: Path) -> Path:
    questions = {
        "What is 2 + 3?": ["2 + 3 = 5", "It is five.", "Five, 5."],
        "How many legs has a cat?": ["Four legs.", "A cat has 4.", "4 legs"],
    }
    lines = []
    for number, (question, answers) in enumerate(questions.items()):
        rollouts = [{"response_text": a, "reward": has_digit(question, a)} for a in answers]
        lines.append(
            {
                "group_id": f"g{number}",
                "messages": [{"role": "user", "content": question}],
                "rollouts": rollouts,
            }
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.slow
def test_calibrate_resumes_writes_params_and_a_server_serves_them(
    tmp_path: Path, backend: TorchBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    groups = _groups_file(tmp_path / "groups.jsonl")
    out = tmp_path / "params.json"
    work = tmp_path / "params.work.jsonl"
    argv = [
        "calibrate",
        "--input",
        str(groups),
        "--reward",
        "tests.test_calibrate:has_digit",
        "--out",
        str(out),
        "--states-per-group",
        "1",
        "--mc",
        "2",
        "--max-new-tokens",
        "4",
        "--quiet",
    ]  # fmt: skip

    assert main([*argv, "--budget", "1"], backend=backend) == 0
    assert "2 in all, 0 done before" in capsys.readouterr().err
    first = work.read_text().splitlines()
    assert len(first) == 2  # the header and one state
    assert not out.exists()  # the table and the params wait for every state

    assert main(argv, backend=backend) == 0
    captured = capsys.readouterr()
    assert "1 done before" in captured.err and "1 run now, 0 left" in captured.err
    lines = work.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3
    records = [json.loads(line) for line in lines[1:]]
    assert len({r["group"] for r in records}) == 2
    assert all(len(r["rewards"]) == 2 for r in records)
    assert "| group mean |" in captured.out and "| ½ own reward + ½ group mean |" in captured.out
    assert "best numca:" in captured.out and "best hista:" in captured.out
    params = json.loads(out.read_text())
    assert set(params) <= {"numca", "hista"}
    load_params(out)

    assert main(argv, backend=backend) == 0  # every state done: nothing runs again
    assert "2 done before" in capsys.readouterr().err
    assert work.read_text().splitlines() == lines
    assert json.loads(out.read_text()) == params

    with running_server(backend, params_file=out) as server:
        assert _reported(server) == params


def _reported(server: ServerThread) -> dict[str, dict[str, object]]:
    """The default params of /v1/model, after checking that GetModelInfo agrees."""
    http = httpx.get(f"{server.http_url}/v1/model", timeout=30).json()["default_params"]
    with ValueClient(server.grpc_target) as client:
        assert client.model_info().default_params == http
    return dict(http)


# -- a server with a params file ----------------------------------------------------------


@pytest.fixture(scope="module")
def params_server(
    backend: TorchBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("params") / "params.json"
    path.write_text(json.dumps(PARAMS))
    with running_server(backend, params_file=path) as server:
        yield server


def _short_group() -> GroupInput:
    return GroupInput(
        group_id="g",
        prompt_ids=np.array([1, 2, 3]),
        rollouts=[
            RolloutInput(response_ids=np.arange(10, 70), reward=1.0),
            RolloutInput(response_ids=np.arange(20, 75), reward=0.0),
            RolloutInput(response_ids=np.arange(30, 60), reward=1.0),
        ],
    )


def test_server_reports_its_params(params_server: ServerThread) -> None:
    # A fixed length set alone is reported with its relative field at 0, which it implies.
    assert _reported(params_server) == {
        "numca": {"merge_distance": 10, "relative_merge_distance": 0.0},
        "hista": {"node_spacing": 10, "relative_node_spacing": 0.0, "k_max": 8},
    }


def test_server_params_are_the_defaults_of_requests(
    params_server: ServerThread, engine: Engine
) -> None:
    group = _short_group()
    body = {
        "methods": ["hista"],
        "groups": [
            {
                "prompt_ids": group.prompt_ids.tolist(),  # type: ignore[union-attr]
                "rollouts": [
                    {"response_ids": r.response_ids.tolist(), "reward": r.reward}  # type: ignore[union-attr]
                    for r in group.rollouts
                ],
            }
        ],
    }

    def served(params: dict[str, object]) -> np.ndarray:
        reply = httpx.post(
            f"{params_server.http_url}/v1/estimate", json={**body, "params": params}, timeout=120
        )
        reply.raise_for_status()
        return np.concatenate([r["values"]["hista"] for r in reply.json()["groups"][0]["rollouts"]])

    def local(params: dict[str, object]) -> np.ndarray:
        config = EstimatorConfig.model_validate(params)
        result = engine.estimate(EstimateRequest([group], ("hista",), config))
        return np.concatenate([r.values["hista"] for r in result.groups[0].rollouts])

    np.testing.assert_allclose(served({}), local(PARAMS), atol=1e-6)
    # A field the request sets wins; the file's other fields stay.
    overridden = local({"hista": {"node_spacing": 20, "k_max": 8}})
    np.testing.assert_allclose(served({"hista": {"node_spacing": 20}}), overridden, atol=1e-6)
    assert not np.allclose(overridden, local(PARAMS))
