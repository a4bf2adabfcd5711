import math

import pytest
import torch

from pfclib import margins
from pfclib.margins import ArcFace, CombinedMargin, CosFace, NormSoftmax


def _explicit_target(c, m1, m2, m3):
    """fp64 textbook value cos(m1*theta + m2) - m3, valid where m1*theta + m2 <= pi."""
    return torch.cos(m1 * torch.acos(c) + m2) - m3


def _interior_cos(n=64, seed=0, lo=-0.7, hi=0.95):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).requires_grad_()


@pytest.mark.parametrize(
    "margin, params",
    [
        (ArcFace(s=64.0, m=0.5), (1.0, 0.5, 0.0)),
        (CosFace(s=30.0, m=0.4), (1.0, 0.0, 0.4)),
        (CombinedMargin(s=64.0, m1=1.2, m2=0.3, m3=0.1), (1.2, 0.3, 0.1)),
        (CombinedMargin(s=64.0, m1=1.0, m2=0.5, m3=0.0), (1.0, 0.5, 0.0)),
    ],
)
def test_target_value_and_textbook_gradient_match_explicit_formula_fp64(margin, params):
    c = _interior_cos()
    ours = margin.target_cosine(c)
    (g_ours,) = torch.autograd.grad(ours.sum(), c)
    c2 = c.detach().clone().requires_grad_()
    ref = _explicit_target(c2, *params)
    (g_ref,) = torch.autograd.grad(ref.sum(), c2)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)


def test_arcface_straight_through_has_same_value_and_unit_derivative():
    c = _interior_cos()
    st = ArcFace(straight_through=True).target_cosine(c)
    textbook = ArcFace().target_cosine(c)
    torch.testing.assert_close(st, textbook, rtol=0, atol=1e-15)
    (g,) = torch.autograd.grad(st.sum(), c)
    torch.testing.assert_close(g, torch.ones_like(g), rtol=0, atol=0)
    assert margins.create("arcface_st") == ArcFace(straight_through=True)


def test_straight_through_logit_gradient_is_s_on_the_target():
    cos = torch.tensor([[0.3, 0.7, -0.2]], dtype=torch.float64, requires_grad=True)
    logits = ArcFace(s=64.0, straight_through=True)(cos, torch.tensor([1]))
    (g,) = torch.autograd.grad(logits[0, 1], cos)
    assert g.tolist() == [[0.0, 64.0, 0.0]]


@pytest.mark.parametrize("straight_through", [False, True])
def test_arcface_beyond_pi_is_continuous_increasing_and_cosface_like(straight_through):
    m = 0.5
    arc = ArcFace(m=m, straight_through=straight_through)
    boundary = math.cos(math.pi - m)
    c = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64)
    v = arc.target_cosine(c)
    assert bool((v[1:] >= v[:-1]).all()), "target logit must not decrease as the cosine grows"
    tail = c < boundary
    torch.testing.assert_close(v[tail], c[tail] - (1 - math.cos(m)), rtol=0, atol=1e-12)
    eps = 1e-9
    left = arc.target_cosine(torch.tensor([boundary - eps], dtype=torch.float64))
    right = arc.target_cosine(torch.tensor([boundary + eps], dtype=torch.float64))
    assert abs(float(left - right)) < 1e-6
    assert float(arc.target_cosine(torch.tensor([-1.0], dtype=torch.float64))) == pytest.approx(
        -2 + math.cos(m)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["arcface", "combined"])
def test_textbook_gradient_is_finite_at_plus_minus_one(name, dtype):
    c = torch.tensor([1.0, -1.0, 1.0 - 1e-7, -1.0 + 1e-7, 0.0], dtype=dtype, requires_grad=True)
    v = margins.create(name).target_cosine(c)
    (g,) = torch.autograd.grad(v.sum(), c)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    # the derivative at +1 is the floored textbook one: sin(theta + m) / max(sin theta, SIN_FLOOR)
    assert float(g[0]) == pytest.approx(math.sin(0.5) / margins.SIN_FLOOR, rel=1e-5)
    assert float(g[1]) == 1.0  # beyond pi: the linear continuation


def test_margin_call_builds_logits_and_leaves_cos_untouched():
    cos = torch.tensor([[0.1, 0.9, -0.3], [0.5, 0.2, 0.45]], dtype=torch.float64)
    before = cos.clone()
    target = torch.tensor([1, -1])
    logits = CosFace(s=10.0, m=0.4)(cos, target)
    expected = 10.0 * before
    expected[0, 1] = 10.0 * (0.9 - 0.4)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-14)
    assert torch.equal(cos, before)


def test_inter_class_filter_zeroes_noisy_negatives_without_gradient():
    cos = torch.tensor([[0.6, 0.3, 0.5, 0.41], [0.9, 0.2, 0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 0])
    m = ArcFace(s=64.0, m=0.5, filter_threshold=0.4)
    logits = m(cos, target)
    # row 0: target 0.6 keeps its margin although > t; 0.5 and 0.41 are filtered; 0.3 stays
    assert logits[0, 2].item() == 0.0 and logits[0, 3].item() == 0.0
    assert logits[0, 1].item() == pytest.approx(64 * 0.3)
    assert logits[0, 0].item() == pytest.approx(64 * math.cos(math.acos(0.6) + 0.5))
    (g,) = torch.autograd.grad(logits.sum(), cos)
    assert g[0, 2].item() == 0.0 and g[0, 3].item() == 0.0 and g[0, 1].item() == 64.0
    # a filtered entry stays in the denominator as exp(0)
    lse = torch.logsumexp(logits[0], 0)
    expected = torch.log(torch.exp(logits[0, 0]) + torch.exp(logits[0, 1]) + 2.0)
    torch.testing.assert_close(lse, expected)


def test_no_filter_leaves_high_negatives():
    cos = torch.tensor([[0.2, 0.95]], dtype=torch.float64)
    assert NormSoftmax(s=2.0)(cos, torch.tensor([0])).tolist() == [[0.4, 1.9]]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("arcface", ArcFace()),
        ("cosface", CosFace()),
        ({"name": "arcface", "m": 0.3, "filter_threshold": 0.4}, ArcFace(m=0.3, filter_threshold=0.4)),
        ({"name": "combined", "m1": 1.0, "m2": 0.3, "m3": 0.2}, CombinedMargin(m2=0.3, m3=0.2)),
        ({"name": "arcface_st", "s": 32.0}, ArcFace(s=32.0, straight_through=True)),
    ],
)
def test_create_from_name_and_dict(spec, expected):
    assert margins.create(spec) == expected


@pytest.mark.parametrize(
    "m",
    [
        ArcFace(),
        ArcFace(straight_through=True, filter_threshold=0.4),
        CosFace(m=0.35),
        CombinedMargin(m1=1.1),
    ],
)
def test_to_dict_round_trips(m):
    assert margins.create(m.to_dict()) == m
    assert margins.create(m) is m


def test_create_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown margin 'sphere'.*arcface"):
        margins.create("sphere")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['mm'\]"):
        margins.create({"name": "cosface", "mm": 0.1})
    with pytest.raises(ValueError, match="needs a 'name'"):
        margins.create({"m": 0.1})
    with pytest.raises(TypeError, match="got int"):
        margins.create(3)


@pytest.mark.parametrize(
    "ctor, match",
    [
        (lambda: ArcFace(s=0.0), "scale s"),
        (lambda: ArcFace(m=4.0), r"\[0, pi\)"),
        (lambda: CosFace(filter_threshold=1.5), "filter_threshold"),
        (lambda: CombinedMargin(m1=0.0), "m1"),
    ],
)
def test_invalid_margin_parameters(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_margin_shape_errors():
    with pytest.raises(ValueError, match="expected cos"):
        ArcFace()(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
