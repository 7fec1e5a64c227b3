"""The forward-time model behind admission: per token, robust to request size, following load."""

from __future__ import annotations

import pytest

from statevalue.forward_time import ForwardTimeModel


def line(tokens: float, overhead: float = 0.05, per_token: float = 0.002) -> float:
    return overhead + per_token * tokens


def test_the_fit_recovers_overhead_and_per_token_time() -> None:
    model = ForwardTimeModel()
    for tokens in (256, 512, 100, 900, 300):
        model.add(tokens, line(tokens))
    assert model.overhead == pytest.approx(0.05)
    assert model.per_token == pytest.approx(0.002)
    assert model.seconds(1000) == pytest.approx(2.05)
    # About one second of work: (1 - 0.05) / 0.002 tokens, within the cap.
    assert model.tokens_within(1.0, 8192) in (474, 475)  # float rounding
    assert model.tokens_within(1.0, 300) == 300
    assert model.tokens_within(0.01, 8192) == 1


def test_many_tiny_batches_do_not_make_big_ones_look_slow() -> None:
    model = ForwardTimeModel()
    model.add(256, line(256))
    model.add(1024, line(1024))
    for _ in range(20):
        model.add(8, line(8))
    # Per-token time still right: a naive tokens / seconds would say 8 / 0.066 = 121 tokens/s.
    assert model.seconds(1024) == pytest.approx(line(1024), rel=1e-6)


def test_like_sized_batches_rescale_the_line_under_contention() -> None:
    model = ForwardTimeModel(window=4)
    model.add(256, line(256))
    model.add(1024, line(1024))
    for _ in range(4):
        # Another process takes half the machine: every batch of 500 takes twice as long.
        model.add(500, 2 * line(500))
    # Exact at the size that runs; other sizes follow (the line fitted while the load
    # changed mixes both speeds, so only roughly).
    assert model.seconds(500) == pytest.approx(2 * line(500))
    assert model.seconds(1000) == pytest.approx(2 * line(1000), rel=0.3)


def test_before_any_sample_there_is_no_estimate() -> None:
    model = ForwardTimeModel()
    assert not model.ready and model.seconds(100) == 0.0
    assert model.tokens_within(1.0, 4096) == 4096
    model.add(0, 1.0)
    model.add(100, float("nan"))
    assert not model.ready
    model.add(100, 0.5)
    assert model.ready and model.seconds(200) == pytest.approx(1.0)
