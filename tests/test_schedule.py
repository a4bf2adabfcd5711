"""Warm-up + polynomial decay: closed-form values, LambdaLR integration, state round trip, set_step."""

from __future__ import annotations

import io

import pytest
import torch

from pfclib.schedule import WarmupPolyDecay, make_schedulers, set_step


def reference(step: int, total: int, warmup: int, power: float, floor: float) -> float:
    """The schedule written out independently, in exact rational steps."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return floor
    remaining = (total - step) / (total - warmup)
    return floor + (1 - floor) * remaining**power


@pytest.mark.parametrize(
    ("total", "warmup", "power", "floor"), [(10, 0, 2.0, 0.0), (20, 5, 2.0, 0.0), (7, 3, 1.0, 0.1)]
)
def test_matches_reference_formula(total, warmup, power, floor):
    f = WarmupPolyDecay(total, warmup, power, floor)
    for step in range(total + 3):
        assert f(step) == pytest.approx(reference(step, total, warmup, power, floor), abs=1e-15)


def test_shape_of_the_curve():
    f = WarmupPolyDecay(100, 10, 2.0)
    values = [f(t) for t in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0 and values[10] == 1.0
    assert all(a < b for a, b in zip(values[:10], values[1:10]))  # rising warm-up
    assert all(a > b for a, b in zip(values[10:], values[11:]))  # strictly decaying
    assert values[55] == pytest.approx(0.5**2)  # halfway through the decay
    assert values[-1] == pytest.approx((1 / 90) ** 2)
    assert f(100) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_steps": 0}, "total_steps must be >= 1, got 0"),
        ({"total_steps": 5, "warmup_steps": 6}, r"warmup_steps must be in \[0, total_steps=5\], got 6"),
        ({"total_steps": 5, "power": -1.0}, "power must be >= 0, got -1.0"),
        ({"total_steps": 5, "min_lr_ratio": 2.0}, r"min_lr_ratio must be in \[0, 1\], got 2.0"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupPolyDecay(**kwargs)


def _two_optimizers():
    a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    b = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.02)
    return a, b


def test_lambdalr_drives_both_optimizers_with_one_schedule():
    a, b = _two_optimizers()
    f = WarmupPolyDecay(12, 4)
    scheds = make_schedulers([a, b], f)
    for step in range(12):
        assert a.param_groups[0]["lr"] == pytest.approx(0.1 * f(step), rel=1e-12)
        assert b.param_groups[0]["lr"] == pytest.approx(0.02 * f(step), rel=1e-12)
        a.step()
        b.step()
        for s in scheds:
            s.step()


def test_state_dict_round_trips_with_weights_only_and_set_step_is_bitwise():
    a, b = _two_optimizers()
    f = WarmupPolyDecay(30, 5, 2.0, 0.05)
    scheds = make_schedulers([a, b], f)
    for _ in range(13):
        a.step()
        b.step()
        for s in scheds:
            s.step()
    buf = io.BytesIO()
    torch.save([s.state_dict() for s in scheds], buf)
    buf.seek(0)
    states = torch.load(buf, weights_only=True)

    a2, b2 = _two_optimizers()
    scheds2 = make_schedulers([a2, b2], WarmupPolyDecay(1, 0))  # wrong params: the state must restore them
    for s, sd in zip(scheds2, states):
        s.load_state_dict(sd)
    set_step(scheds2, 13)
    assert scheds2[0].lr_lambdas[0].total_steps == 30 and scheds2[0].lr_lambdas[0].warmup_steps == 5
    assert [s.last_epoch for s in scheds2] == [13, 13]
    assert a2.param_groups[0]["lr"] == a.param_groups[0]["lr"]  # bitwise, not approx
    assert b2.param_groups[0]["lr"] == b.param_groups[0]["lr"]
    assert scheds2[1].get_last_lr() == scheds[1].get_last_lr()
    for s in scheds2:
        s.step()
    for s in scheds:
        s.step()
    assert a2.param_groups[0]["lr"] == a.param_groups[0]["lr"]
