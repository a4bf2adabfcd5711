"""AdaFace and NPCFace: per-row margins against explicit float64 references, on every head path."""

import math

import pytest
import torch
import torch.nn.functional as F

import pfclib
from pfclib import distributed as pdist
from pfclib import margins
from pfclib.margins import AdaFace, ArcFace, NPCFace

C, D, B = 40, 16, 12
PATHS = ["dense", "lazy", "sparse", "chunked"]


# ---------------------------------------------------------------------------- explicit references
def adaface_reference(emb, labels, centers, mg, mean_prev, std_prev):
    """Dense softmax over all given centers with AdaFace's target logit written out by hand;
    returns (loss, updated mean, updated std). The stats are updated first, then used."""
    norms = emb.detach().norm(dim=1).clamp(mg.norm_min, mg.norm_max)
    mean = mg.alpha * norms.mean() + (1 - mg.alpha) * mean_prev
    std = mg.alpha * norms.std() + (1 - mg.alpha) * std_prev
    z = ((norms - mean) / (std + mg.eps) * mg.h).clamp(-1, 1)
    g_angle = -mg.m * z
    g_add = mg.m * z + mg.m
    x = emb / emb.norm(dim=1, keepdim=True)
    w = centers / centers.norm(dim=1, keepdim=True)
    cos = x @ w.T
    rows = torch.arange(len(labels))
    c_t = cos[rows, labels]
    theta = torch.acos(c_t)
    assert bool(((theta + g_angle > 0) & (theta + g_angle < math.pi)).all()), "reference needs 0 < θ+g < π"
    target_logit = torch.cos(theta + g_angle) - g_add
    logits = torch.where(F.one_hot(labels, len(centers)).bool(), target_logit[:, None], cos) * mg.s
    return F.cross_entropy(logits, labels), mean, std


def npcface_reference(emb, labels, centers, mg):
    """Dense softmax over all given centers with NPCFace's hard negatives and collaborative margin."""
    x = emb / emb.norm(dim=1, keepdim=True)
    w = centers / centers.norm(dim=1, keepdim=True)
    cos = x @ w.T
    rows = torch.arange(len(labels))
    onehot = F.one_hot(labels, len(centers)).bool()
    c_t = cos[rows, labels]
    theta = torch.acos(c_t)
    threshold = torch.cos(theta.detach() + mg.m)  # cos(θ_y + m), no gradient
    hard = (cos.detach() > threshold[:, None]) & ~onehot
    count = hard.sum(dim=1).double()
    m_i = mg.m0 + mg.m1 * (cos.detach() * hard).sum(dim=1) / count.clamp(min=1)
    assert bool((theta + m_i < math.pi).all()) and bool((theta + mg.m < math.pi).all())
    positive = torch.cos(theta + m_i)
    negatives = torch.where(hard, mg.t * cos + mg.alpha, cos)
    logits = torch.where(onehot, positive[:, None], negatives) * mg.s
    return F.cross_entropy(logits, labels), int(hard.sum())


# --------------------------------------------------------------------------------------- helpers
def _batch(seed=0, b=B, dtype=torch.float64, scale_rows=True):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, D, generator=g, dtype=dtype)
    if scale_rows:  # norms spread over [0.5, 12]: AdaFace's ẑ takes many values, some clipped
        emb = emb * torch.linspace(0.15, 3.0, b, dtype=dtype)[torch.randperm(b, generator=g)][:, None]
    labels = torch.randint(C, (b,), generator=g)
    return emb, labels


def _head(margin, path, **kw):
    extra = {"dense": {}, "lazy": {}, "sparse": {"update": "sparse"}, "chunked": {"chunk_size": 7}}[path]
    head = pfclib.PartialFC(C, D, margin=margin, dtype=torch.float64, seed=2, **extra, **kw)
    if path == "lazy":
        head.make_optimizer("sgd", lr=0.1)
    return head


def _run(head, emb, labels, index=None):
    e = emb.clone().requires_grad_()
    loss = head(e, labels, index=index)
    loss.backward()
    grad = head.weight.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    return loss.detach(), e.grad, grad


def _fixed_index(labels, extra=(0, 5, 11, 17, 23, 31, 39)):
    return torch.unique(torch.cat([labels, torch.tensor(extra)]))


ADAFACES = [AdaFace(), AdaFace(alpha=1.0, h=1.0, s=32.0)]
NPCFACES = [NPCFace(), NPCFace(s=32.0, m=0.3, m0=0.35, m1=0.3, t=1.2, alpha=0.1)]
TOL = {"rtol": 1e-10, "atol": 1e-10}


# ------------------------------------------------------------------- (a) + (b): the references
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rate", [1.0, 0.4])
@pytest.mark.parametrize("mg", ADAFACES, ids=["paper", "alpha1"])
def test_adaface_matches_explicit_reference_on_every_path(mg, rate, path):
    head = _head(mg, path, sample_rate=rate)
    emb, labels = _batch(seed=1)
    index = None if rate == 1.0 else _fixed_index(labels)
    loss, emb_grad, w_grad = _run(head, emb, labels, index)
    cols = torch.arange(C) if index is None else index
    e64 = emb.clone().requires_grad_()
    w64 = head.weight.detach().clone()  # SGD's step is not taken: the weights are those used
    if path == "lazy":
        w64 = head.centers()
    w64 = w64[cols].clone().requires_grad_()
    ref, mean, std = adaface_reference(
        e64,
        torch.searchsorted(cols, labels),
        w64,
        mg,
        torch.tensor(mg.mean_init, dtype=torch.float64),
        torch.tensor(mg.std_init, dtype=torch.float64),
    )
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(emb_grad, e64.grad, **TOL)
    torch.testing.assert_close(w_grad[cols], w64.grad, **TOL)
    assert torch.count_nonzero(w_grad[torch.isin(torch.arange(C), cols, invert=True)]) == 0
    torch.testing.assert_close(head.margin_batch_mean, mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(head.margin_batch_std, std, rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rate", [1.0, 0.4])
@pytest.mark.parametrize("mg", NPCFACES, ids=["paper", "other"])
def test_npcface_matches_explicit_reference_on_every_path(mg, rate, path):
    head = _head(mg, path, sample_rate=rate)
    emb, labels = _batch(seed=2, scale_rows=False)
    index = None if rate == 1.0 else _fixed_index(labels)
    loss, emb_grad, w_grad = _run(head, emb, labels, index)
    cols = torch.arange(C) if index is None else index
    e64 = emb.clone().requires_grad_()
    w64 = (head.centers() if path == "lazy" else head.weight.detach())[cols].clone().requires_grad_()
    ref, n_hard = npcface_reference(e64, torch.searchsorted(cols, labels), w64, mg)
    ref.backward()
    assert 0 < n_hard < B * (len(cols) - 1)  # the batch has hard and easy negatives
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(emb_grad, e64.grad, **TOL)
    torch.testing.assert_close(w_grad[cols], w64.grad, **TOL)


@pytest.mark.parametrize("mg", [ADAFACES[1], NPCFACES[0], NPCFace(filter_threshold=0.3)], ids=str)
def test_dense_chunked_and_fused_paths_agree_over_two_steps(mg):
    """Two optimizer steps (the head's own sampling at r = 0.5) on every path: same losses,
    gradients and centers; AdaFace's running statistics move identically."""
    emb, labels = _batch(seed=3)
    out = {}
    for path in PATHS:
        head = _head(mg, path, sample_rate=0.5)
        if path == "dense":  # torch's SGD on the dense gradient of the (N, k) logits path
            opt = torch.optim.SGD([head.weight], lr=0.5, momentum=0.9, weight_decay=5e-4)
        else:  # LazySGD (same result as torch's SGD) or SparseSGD (equal on the first step only)
            opt = head.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
        steps = []
        for step in range(2):
            loss, eg, wg = _run(head, emb * (1 + step), labels)
            steps.append((loss, eg, wg.clone(), head.last_index.clone()))
            opt.step()
            opt.zero_grad()
        head.sync()
        out[path] = (steps, dict(head.named_buffers()))
    base_steps, base_buf = out["dense"]
    for path in ("lazy", "chunked"):  # same optimizer semantics: everything equal
        steps, buf = out[path]
        for (l0, e0, w0, i0), (l1, e1, w1, i1) in zip(base_steps, steps):
            assert torch.equal(i0, i1)
            torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(e1, e0, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(w1, w0, rtol=1e-10, atol=1e-12)
        for k, v in base_buf.items():
            torch.testing.assert_close(buf[k], v, rtol=1e-14, atol=0)
    # sparse (other optimizer): its first step equals the dense one
    (l0, e0, w0, _), (l1, e1, w1, _) = base_steps[0], out["sparse"][0][0]
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e1, e0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1, w0, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------- AdaFace's state
def test_adaface_running_statistics_are_buffers_updated_in_training_only():
    mg = AdaFace()
    head = pfclib.PartialFC(C, D, margin=mg, dtype=torch.float64)
    sd = head.state_dict()
    assert sd["margin_batch_mean"].item() == 20.0 and sd["margin_batch_std"].item() == 100.0
    emb, labels = _batch(seed=4)
    mean, std = torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)
    for step in range(3):
        e = emb * (step + 1)
        head(e, labels)
        n = e.norm(dim=1).clamp(0.001, 100)
        mean = 0.01 * n.mean() + 0.99 * mean
        std = 0.01 * n.std() + 0.99 * std
        torch.testing.assert_close(head.margin_batch_mean, mean, rtol=1e-14, atol=0)
        torch.testing.assert_close(head.margin_batch_std, std, rtol=1e-14, atol=0)
    head.eval()
    with torch.no_grad():
        head(emb, labels)
    torch.testing.assert_close(head.margin_batch_mean, mean, rtol=0, atol=0)
    # state_dict round trip carries them
    other = pfclib.PartialFC(C, D, margin=mg, dtype=torch.float64)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other.margin_batch_std, head.margin_batch_std)


def test_adaface_running_statistics_travel_in_full_and_sharded_head_states(tmp_path):
    from pfclib import head_state

    head = pfclib.PartialFC(C, D, margin=AdaFace(), dtype=torch.float64)
    emb, labels = _batch(seed=5)
    head(emb * 3, labels)
    moved = {"batch_mean": head.margin_batch_mean.item(), "batch_std": head.margin_batch_std.item()}
    assert moved != AdaFace().initial_state()
    full = head.full_state_dict()
    assert full["margin_state"] == moved
    fresh = pfclib.PartialFC(C, D, margin=AdaFace(), dtype=torch.float64)
    fresh.load_full_state_dict(full)
    assert fresh.margin_batch_mean.item() == moved["batch_mean"]
    assert fresh.margin_batch_std.item() == moved["batch_std"]
    # sharded: the manifest carries them, and read_sharded_state passes them on
    torch.save(head_state.shard_state_dict(head), tmp_path / "rank_00000.pt")
    entry = {
        "file": "rank_00000.pt",
        "start": 0,
        "end": C,
        "bytes": (tmp_path / "rank_00000.pt").stat().st_size,
    }
    manifest = head_state.sharded_manifest(head, [entry], ".")
    assert manifest["margin_state"] == moved
    fresh = pfclib.PartialFC(C, D, margin=AdaFace(), dtype=torch.float64)
    head_state.load_sharded_state(fresh, manifest, tmp_path)
    assert fresh.margin_batch_mean.item() == moved["batch_mean"]
    assert head_state.read_sharded_state(manifest, tmp_path)["margin_state"] == moved
    # a state without them (or for another margin) is refused by name
    with pytest.raises(
        ValueError, match=r"holds margin state \[\]; margin 'adaface' keeps \['batch_mean', 'batch_std'\]"
    ):
        fresh.load_full_state_dict({**full, "margin_state": {}})
    arc = pfclib.PartialFC(C, D, margin="arcface", dtype=torch.float64)
    assert arc.full_state_dict()["margin_state"] == {}
    with pytest.raises(
        ValueError, match=r"holds margin state \['batch_mean', 'batch_std'\]; margin 'arcface' keeps \[\]"
    ):
        arc.load_full_state_dict(full)


def test_margins_without_state_or_context_add_no_buffer_and_no_collective(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a margin without needs_negatives must not build a negative context")

    monkeypatch.setattr(pdist, "hard_negative_context", boom)
    monkeypatch.setattr(pdist, "_chunked_negative_context", boom)
    emb, labels = _batch(seed=5)
    for name in ("arcface", "arcface_st", "cosface", "combined", "softmax"):
        for kw in ({}, {"chunk_size": 5}, {"update": "sparse"}):
            head = pfclib.PartialFC(C, D, margin=name, dtype=torch.float64, **kw)
            assert not any(k.startswith("margin_") for k in head.state_dict())
            head(emb, labels).backward()


# ------------------------------------------------------------------------- continuation
@pytest.mark.parametrize("m2", [0.4, -0.4, 0.0])
def test_row_angular_target_is_continuous_increasing_beyond_zero_and_pi(m2):
    c = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
    m = torch.full_like(c, m2)
    v = margins.row_angular_target(c, m, torch.full_like(c, 0.1))
    assert bool((v[1:] >= v[:-1]).all())
    for boundary in (math.cos(math.pi - m2), math.cos(-m2)):  # θ + m2 = π and θ + m2 = 0
        if abs(boundary) < 1:
            pair = torch.tensor([boundary - 1e-9, boundary + 1e-9], dtype=torch.float64)
            left, right = margins.row_angular_target(pair, torch.full_like(pair, m2))
            assert abs(float(left - right)) < 1e-6  # continuous across the boundary
    theta = torch.acos(c)
    inside = (theta + m2 >= 0) & (theta + m2 <= math.pi)
    torch.testing.assert_close(v[inside], torch.cos(theta[inside] + m2) - 0.1, rtol=0, atol=1e-12)
    if m2 > 0:
        tail = theta + m2 > math.pi
        torch.testing.assert_close(v[tail], c[tail] + math.cos(m2) - 1 - 0.1, rtol=0, atol=1e-12)
    if m2 < 0:
        tail = theta + m2 < 0
        torch.testing.assert_close(v[tail], c[tail] - math.cos(m2) + 1 - 0.1, rtol=0, atol=1e-12)


def test_row_angular_target_gradient_matches_textbook_inside():
    g = torch.Generator().manual_seed(0)
    c = (torch.rand(50, generator=g, dtype=torch.float64) * 1.4 - 0.6).requires_grad_()
    m2 = torch.rand(50, generator=g, dtype=torch.float64) * 0.8 - 0.4
    m3 = torch.rand(50, generator=g, dtype=torch.float64)
    (g1,) = torch.autograd.grad(margins.row_angular_target(c, m2, m3).sum(), c)
    c2 = c.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad((torch.cos(torch.acos(c2) + m2) - m3).sum(), c2)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------- (d) finite at cos = ±1 and zero norms
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("margin", ["adaface", "npcface", {"name": "adaface", "alpha": 1.0, "h": 1.0}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_at_plus_minus_one_and_zero_norm(margin, path, dtype):
    extra = {"dense": {}, "lazy": {}, "sparse": {"update": "sparse"}, "chunked": {"chunk_size": 4}}[path]
    head = pfclib.PartialFC(C, D, margin=margin, dtype=dtype, **extra)
    if path == "lazy":
        head.make_optimizer("sgd")
    labels = torch.tensor([3, 3, 5, 6, 7, 9])
    emb = head.weight.detach()[labels].clone()
    emb[0] *= 500.0  # a large norm (clipped to 100, ẑ = +1 for alpha = h = 1)
    emb[3] = -emb[3]  # cos = -1 at the target
    emb[4] = 0.0  # a zero-norm embedding
    emb[5] *= 1e-9
    emb.requires_grad_()
    loss = head(emb, labels)
    loss.backward()
    grad = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(b).all() for b in head.buffers())


def test_adaface_single_row_batch_and_identical_norms_stay_finite():
    head = pfclib.PartialFC(C, D, margin={"name": "adaface", "alpha": 1.0}, dtype=torch.float64)
    emb, labels = _batch(seed=6, b=1)
    e = emb.requires_grad_()
    head(e, labels).backward()
    assert torch.isfinite(e.grad).all() and head.margin_batch_std.item() == 0.0
    same = torch.nn.functional.normalize(torch.randn(4, D, dtype=torch.float64), dim=1) * 3.0
    head(same.requires_grad_(), torch.tensor([1, 2, 3, 4])).backward()
    assert torch.isfinite(same.grad).all()


# ------------------------------------------------------------------------------ (e) errors
@pytest.mark.parametrize(
    "m", [AdaFace(), AdaFace(m=0.3, h=0.5, alpha=0.1), NPCFace(), NPCFace(t=1.3, alpha=0.0)]
)
def test_to_dict_round_trips(m):
    assert margins.create(m.to_dict()) == m
    assert margins.create(m.name) == type(m)()
    assert m.name in margins.list_margins()


@pytest.mark.parametrize(
    "spec, exc, match",
    [
        ({"name": "adaface", "m": -0.1}, ValueError, r"'adaface': m must be in \[0.0, .*got -0.1"),
        ({"name": "adaface", "h": 0.0}, ValueError, r"h must be in \(0.0, inf\), got 0.0"),
        ({"name": "adaface", "alpha": 0.0}, ValueError, r"alpha must be in \(0.0, 1.0\], got 0.0"),
        ({"name": "adaface", "alpha": 1.5}, ValueError, r"alpha .* got 1.5"),
        ({"name": "adaface", "std_init": -1.0}, ValueError, r"std_init .* got -1.0"),
        ({"name": "adaface", "norm_max": 0.0001}, ValueError, r"norm_max .* got 0.0001"),
        ({"name": "adaface", "eps": float("nan")}, ValueError, r"eps .* got nan"),
        ({"name": "adaface", "s": -64.0}, ValueError, r"scale s .* got -64.0"),
        ({"name": "adaface", "m": "0.4"}, TypeError, r"m must be a real number, got str: '0.4'"),
        ({"name": "adaface", "mu": 20}, ValueError, r"unknown parameter\(s\) \['mu'\]"),
        ({"name": "npcface", "t": 0.0}, ValueError, r"'npcface': t must be in \(0.0, inf\), got 0.0"),
        ({"name": "npcface", "m": 3.5}, ValueError, r"m must be in \[0.0, 3.14.*got 3.5"),
        ({"name": "npcface", "m0": 0.1, "m1": 0.2}, ValueError, r"m0=0.1, m1=0.2"),
        ({"name": "npcface", "alpha": True}, TypeError, r"alpha must be a real number, got bool"),
        ({"name": "npcface", "filter_threshold": 2.0}, ValueError, r"filter_threshold .* got 2.0"),
    ],
)
def test_bad_parameters_name_the_value(spec, exc, match):
    with pytest.raises(exc, match=match):
        margins.create(spec)


def test_per_row_margins_called_without_context_say_so():
    cos = torch.zeros(2, 3, dtype=torch.float64)
    for mg in (AdaFace(), NPCFace()):
        with pytest.raises(ValueError, match="needs a per-row context"):
            mg(cos, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="needs the rows' context"):
            mg.target_cosine(cos[:, 0])
    assert ArcFace()(cos, torch.tensor([0, 1])).shape == (2, 3)
