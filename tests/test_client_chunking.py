"""Splitting a step into requests under the server's limits, and replica addresses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statevalue_client.chunking import RequestLimits, check_unique_ids, plan_requests
from statevalue_client.targets import is_multi_address, replica_addresses


def names(n: int) -> list[str]:
    return [f"g{i}" for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(1, 100), min_size=1, max_size=60),
    max_tokens=st.integers(100, 400),
    max_groups=st.integers(1, 10),
    prompts=st.integers(1, 8),
)
def test_every_group_once_and_every_request_within_the_limits(
    tokens: list[int], max_tokens: int, max_groups: int, prompts: int
) -> None:
    prompt_ids = [f"p{i % prompts}" for i in range(len(tokens))]
    plan = plan_requests(
        tokens, prompt_ids, names(len(tokens)), RequestLimits(max_tokens, max_groups)
    )
    assert sorted(i for request in plan for i in request) == list(range(len(tokens)))
    for request in plan:
        assert request
        assert sum(tokens[i] for i in request) <= max_tokens
        assert len(request) <= max_groups


def test_groups_of_one_prompt_travel_together_when_they_fit() -> None:
    tokens = [10] * 12
    prompt_ids = ["a", "b", "c"] * 4
    plan = plan_requests(tokens, prompt_ids, names(12), RequestLimits(40, 8))
    for prompt in "abc":
        holding = [
            r for r, request in enumerate(plan) if any(prompt_ids[i] == prompt for i in request)
        ]
        assert len(holding) == 1, (prompt, plan)
    # 120 tokens need three requests of 40: each holds exactly one prompt's four groups.
    assert sorted(len(request) for request in plan) == [4, 4, 4]


def test_requests_are_balanced() -> None:
    # 11 groups of 10 tokens under a 100-token limit: two requests of about 55, not 100 + 10.
    plan = plan_requests([10] * 11, [""] * 11, names(11), RequestLimits(100, 100))
    assert sorted(len(request) for request in plan) == [5, 6]


def test_no_limits_means_one_request() -> None:
    assert plan_requests([5, 7, 9], ["", "", ""], names(3), RequestLimits()) == [[0, 1, 2]]


def test_a_group_over_the_token_limit_is_named() -> None:
    with pytest.raises(ValueError, match=r"limit of 50 .*g1 \(60 tokens\)"):
        plan_requests([10, 60, 10], ["", "", ""], names(3), RequestLimits(50, 10))


def test_duplicate_group_ids_are_named() -> None:
    check_unique_ids(["a", "b", "", ""])  # unnamed groups are named by position
    with pytest.raises(ValueError, match=r"'a' \(groups 0, 2\)") as caught:
        check_unique_ids(["a", "b", "a", "c", "c"])
    assert "'c' (groups 3, 4)" in str(caught.value)
    assert "'b'" not in str(caught.value)


def test_replica_addresses() -> None:
    assert replica_addresses("ipv4:127.0.0.1:5001,127.0.0.2:5002") == [
        "127.0.0.1:5001",
        "127.0.0.2:5002",
    ]
    assert replica_addresses("ipv6:[::1]:5001") == ["[::1]:5001"]
    assert "127.0.0.1:5003" in replica_addresses("dns:///localhost:5003")
    assert "127.0.0.1:5003" in replica_addresses("dns://8.8.8.8/localhost:5003")
    assert replica_addresses("localhost:5003") == ["localhost:5003"]
    assert is_multi_address("ipv4:127.0.0.1:1,127.0.0.1:2")
    assert not is_multi_address("localhost:5003")
    with pytest.raises(ValueError, match="cannot resolve"):
        replica_addresses("dns:///no-such-host.invalid:1")


def test_a_time_target_cuts_more_requests_but_never_a_group() -> None:
    tokens = [100] * 10 + [700]
    plan = plan_requests(tokens, [""] * 11, names(11), RequestLimits(2000, 0), target_tokens=250)
    assert sorted(i for request in plan for i in request) == list(range(11))
    sizes = [sum(tokens[i] for i in request) for request in plan]
    # The 700-token group goes whole; the rest in requests near the 250-token target.
    assert 700 in sizes and len(plan) >= 6
    assert all(size <= 300 for size in sizes if size != 700)
    assert len(plan_requests(tokens, [""] * 11, names(11), RequestLimits(2000, 0))) == 1
