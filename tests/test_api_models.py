"""The JSON wire models, the estimator parameters and the .proto stay in step."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from pydantic import BaseModel, ValidationError

from statevalue import api_models
from statevalue.config import (
    AdvantageConfig,
    EstimatorConfig,
    HistaConfig,
    NumcaConfig,
    SelfCalibrationConfig,
)
from statevalue.grpc_server import params_from_proto, params_to_proto
from statevalue.schema import InvalidRequest
from statevalue_client.proto import statevalue_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
# Packed bytes need an explicit element count beside them; JSON lists carry their own.
COUNT_FIELDS = {"num_tokens", "prompt_num_tokens"}

REQUEST_PAIRS: list[tuple[type[BaseModel], Descriptor]] = [
    (api_models.RolloutIn, pb.Rollout.DESCRIPTOR),
    (api_models.GroupIn, pb.Group.DESCRIPTOR),
    (api_models.ChatMessage, pb.ChatMessage.DESCRIPTOR),
    (api_models.EstimateIn, pb.EstimateRequest.DESCRIPTOR),
    (api_models.HistaStatesFormatIn, pb.HistaStatesFormat.DESCRIPTOR),
]
PARAM_PAIRS: list[tuple[type[BaseModel], Descriptor]] = [
    (EstimatorConfig, pb.EstimatorParams.DESCRIPTOR),
    (NumcaConfig, pb.NumcaParams.DESCRIPTOR),
    (HistaConfig, pb.HistaParams.DESCRIPTOR),
    (AdvantageConfig, pb.AdvantageParams.DESCRIPTOR),
    (SelfCalibrationConfig, pb.SelfCalibrationParams.DESCRIPTOR),
]


@pytest.mark.parametrize(
    ("model", "message"), REQUEST_PAIRS, ids=[m.__name__ for m, _ in REQUEST_PAIRS]
)
def test_request_models_match_the_proto(model: type[BaseModel], message: Descriptor) -> None:
    json_fields = set(model.model_fields)
    proto = set(message.fields_by_name)
    assert json_fields == proto - COUNT_FIELDS, (
        f"{model.__name__} vs {message.name}: only in JSON {json_fields - proto}, "
        f"only in proto {proto - json_fields - COUNT_FIELDS}"
    )


def test_model_info_matches_the_proto() -> None:
    assert set(api_models.ModelInfoOut.model_fields) == set(pb.ModelInfo.DESCRIPTOR.fields_by_name)


def test_count_fields_sit_beside_packed_bytes() -> None:
    assert pb.Rollout.DESCRIPTOR.fields_by_name["response_ids"].type == FieldDescriptor.TYPE_BYTES
    assert pb.Rollout.DESCRIPTOR.fields_by_name["num_tokens"].type == FieldDescriptor.TYPE_UINT32
    assert pb.Group.DESCRIPTOR.fields_by_name["prompt_ids"].type == FieldDescriptor.TYPE_BYTES
    assert (
        pb.Group.DESCRIPTOR.fields_by_name["prompt_num_tokens"].type == FieldDescriptor.TYPE_UINT32
    )


@pytest.mark.parametrize(
    ("model", "message"), PARAM_PAIRS, ids=[m.__name__ for m, _ in PARAM_PAIRS]
)
def test_estimator_parameters_match_the_proto(model: type[BaseModel], message: Descriptor) -> None:
    assert set(model.model_fields) == set(message.fields_by_name)


@pytest.mark.parametrize(
    ("model", "message"), PARAM_PAIRS[1:], ids=[m.__name__ for m, _ in PARAM_PAIRS[1:]]
)
def test_every_parameter_is_optional_on_the_wire(
    model: type[BaseModel], message: Descriptor
) -> None:
    # Unset must mean "the reference default", so proto3 fields need explicit presence.
    for field in message.fields:
        assert field.has_presence, f"{message.name}.{field.name} cannot be left unset"
    assert model().model_dump()  # every field has a default


def other_rules(model: type[BaseModel], names: tuple[str, ...]) -> dict[str, str]:
    """For each two-way rule option, the choice that is not the default."""
    out = {}
    for name in names:
        field = model.model_fields[name]
        (other,) = set(typing.get_args(field.annotation)) - {field.default}
        out[name] = other
    return out


def test_every_parameter_round_trips_through_the_proto() -> None:
    """Non-default values of every field reach the engine's config unchanged."""
    changed = {
        "numca": {
            "number_pattern": "decimal",
            "merge_distance": 7,
            "relative_merge_distance": 0.0,
            "drop_last_number": False,
            "prior_count": 2.0,
            **other_rules(NumcaConfig, ("number_boundary", "table_states", "unseen_state")),
        },
        "hista": {
            "ema_alpha": 0.5,
            "stride": 3,
            "node_spacing": 20,
            "relative_node_spacing": 0.0,
            "d_min": 2.5,
            "k_max": 30,
            "k_min": 4,
            "tau": 2.0,
            "relative_d_min": 0.0,
            "own_weight": 0.25,
            **other_rules(
                HistaConfig,
                (
                    "ema_start",
                    "downsample",
                    "node_anchor",
                    "end_node",
                    "k_schedule",
                    "neighbours",
                    "own_nodes",
                ),
            ),
        },
        "advantage": {
            "gae": "token",
            "gamma": 0.9,
            "lam": 0.95,
            "scale": "batch",
            "scale_eps": 0.01,
        },
        "self_calibration": {
            "enabled": True,
            "combine": False,
            "own_weight": "fitted",
            **other_rules(SelfCalibrationConfig, ("scope",)),
        },
    }
    config = EstimatorConfig.model_validate(changed)
    defaults = EstimatorConfig()
    for section, values in changed.items():
        assert set(values) == set(type(getattr(config, section)).model_fields), section
        for name, value in values.items():
            assert getattr(getattr(defaults, section), name) != value, (section, name)
    params = pb.EstimatorParams()
    for section, values in changed.items():
        for name, value in values.items():
            setattr(getattr(params, section), name, value)
    assert params_from_proto(params) == config
    assert params_to_proto(changed) == params
    assert params_from_proto(pb.EstimatorParams()) == defaults


def test_json_example_parses() -> None:
    body = api_models.EstimateIn.model_validate(
        {
            "methods": ["numca", "hista", "group_mean"],
            "groups": [
                {
                    "group_id": "g1",
                    "prompt_id": "optional-stable-id",
                    "prompt_ids": [1, 2, 3],
                    "rollouts": [
                        {"response_ids": [4, 5, 6], "reward": 1.0},
                        {"response_ids": [7, 8], "reward": 0.0},
                    ],
                }
            ],
        }
    )
    request = body.to_request()
    (group,) = request.groups
    assert group.prompt_id == "optional-stable-id"
    assert [list(r.response_ids) for r in group.rollouts] == [[4, 5, 6], [7, 8]]
    assert [r.reward for r in group.rollouts] == [1.0, 0.0]
    assert request.config == EstimatorConfig()


def test_json_token_ids_have_the_int32_range_of_the_proto() -> None:
    """Ids the int32 wire cannot carry are a schema error (422), not an overflow (500)."""
    edge = {"prompt_ids": [-(2**31)], "rollouts": [{"response_ids": [2**31 - 1], "reward": 1.0}]}
    assert api_models.GroupIn.model_validate(edge).to_input().prompt_ids is not None
    for too_big in ({"prompt_ids": [2**31]}, {"rollouts": [{"response_ids": [2**63]}]}):
        with pytest.raises(ValidationError):
            api_models.GroupIn.model_validate({**edge, **too_big})


def test_generated_stubs_are_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to date" in done.stdout


def test_reference_settings_turn_off_every_rule_beyond_the_paper() -> None:
    numca, hista = NumcaConfig.reference(), HistaConfig.reference()
    assert numca.prior_count == 0.0
    assert (hista.relative_d_min, hista.own_weight, hista.d_min) == (0.0, 1.0, 5.0)
    assert (hista.node_spacing, hista.k_max, hista.k_min) == (50, 66, 6)
    assert (hista.relative_node_spacing, numca.relative_merge_distance) == (0.0, 0.0)
    assert numca.merge_distance == 50
    changed = HistaConfig.reference(node_spacing=10, own_weight=0.5)
    assert (changed.node_spacing, changed.own_weight, changed.relative_d_min) == (10, 0.5, 0.0)
    with pytest.raises(ValidationError):
        NumcaConfig.reference(no_such_field=1)


def test_an_explicit_d_min_is_the_absolute_clamp() -> None:
    assert HistaConfig().relative_d_min > 0  # the default clamp is relative
    assert HistaConfig(d_min=2.0).relative_d_min == 0.0
    assert HistaConfig(d_min=2.0, relative_d_min=0).d_min == 2.0
    with pytest.raises(ValidationError, match="d_min.*relative_d_min"):
        HistaConfig(d_min=2.0, relative_d_min=0.1)
    params = pb.EstimatorParams()
    params.hista.d_min = 2.0
    params.hista.relative_d_min = 0.1
    with pytest.raises(InvalidRequest) as caught:
        params_from_proto(params)
    assert caught.value.field == "params.hista"


def test_an_explicit_spacing_or_merge_distance_is_the_fixed_one() -> None:
    # The defaults follow the group's lengths; a length set alone is used as it is.
    assert HistaConfig().relative_node_spacing > 0 and NumcaConfig().relative_merge_distance > 0
    assert HistaConfig(node_spacing=10).relative_node_spacing == 0.0
    assert NumcaConfig(merge_distance=0).relative_merge_distance == 0.0
    both = HistaConfig(node_spacing=40, relative_node_spacing=0.1)
    assert (both.node_spacing, both.relative_node_spacing) == (40, 0.1)
    params = pb.EstimatorParams()
    params.hista.node_spacing = 10
    params.numca.merge_distance = 0
    config = params_from_proto(params)
    assert (config.hista.relative_node_spacing, config.numca.relative_merge_distance) == (0, 0)
