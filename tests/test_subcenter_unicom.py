"""Sub-center ArcFace (``sub_centers=K``) and Unicom's feature-dimension sampling
(``dim_sample_rate=q``): explicit float64 references, every head path, ranks, state and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import pfclib
from pfclib import head_state
from pfclib.margins import AdaFace, ArcFace, CosFace, NPCFace
from pfclib.multiproc import run_gloo
from pfclib.seeding import SEED_DIM_SAMPLE, derive_seed

C, D, B = 30, 16, 12
PATHS = ["dense", "lazy", "sparse", "chunked", "chunked-lazy"]
TOL = {"rtol": 1e-10, "atol": 1e-10}


# ---------------------------------------------------------------------------- explicit reference
def reference(emb, labels, centers, K, mg, dims=None, adaface_state=None):
    """Dense softmax over all classes of ``centers`` ((n·K, D), class c at rows c·K ... c·K+K-1),
    float64, written out plainly: Unicom keeps the columns ``dims`` of the embeddings and of the
    centers and normalises over them; a class's cosine is the max over its K sub-centers; then the
    margin on the target and the cross-entropy. Returns the loss."""
    if dims is not None:
        emb = emb[:, dims]
        centers = centers[:, dims]
    n_cls = centers.shape[0] // K
    x = emb / emb.norm(dim=1, keepdim=True)
    w = centers / centers.norm(dim=1, keepdim=True)
    cos_sub = x @ w.T  # (N, n·K)
    cos = cos_sub.view(len(labels), n_cls, K).max(dim=2).values  # nearest sub-center of each class
    rows = torch.arange(len(labels))
    onehot = F.one_hot(labels, n_cls).bool()
    c_t = cos[rows, labels]
    theta = torch.acos(c_t)
    negatives = cos
    if isinstance(mg, ArcFace):
        target = torch.cos(theta + mg.m)
    elif isinstance(mg, CosFace):
        target = c_t - mg.m
    elif isinstance(mg, AdaFace):
        mean_prev, std_prev = adaface_state
        norms = emb.detach().norm(dim=1).clamp(mg.norm_min, mg.norm_max)  # of the kept dimensions
        mean = mg.alpha * norms.mean() + (1 - mg.alpha) * mean_prev
        std = mg.alpha * norms.std() + (1 - mg.alpha) * std_prev
        z = ((norms - mean) / (std + mg.eps) * mg.h).clamp(-1, 1)
        assert bool(((theta - mg.m * z > 0) & (theta - mg.m * z < math.pi)).all())
        target = torch.cos(theta - mg.m * z) - (mg.m * z + mg.m)
    elif isinstance(mg, NPCFace):
        threshold = torch.cos(theta.detach() + mg.m)
        hard = (cos.detach() > threshold[:, None]) & ~onehot
        m_i = mg.m0 + mg.m1 * (cos.detach() * hard).sum(dim=1) / hard.sum(dim=1).double().clamp(min=1)
        assert bool((theta + m_i < math.pi).all())
        target = torch.cos(theta + m_i)
        negatives = torch.where(hard, mg.t * cos + mg.alpha, cos)
    else:
        raise AssertionError(mg)
    logits = torch.where(onehot, target[:, None], negatives) * mg.s
    return F.cross_entropy(logits, labels)


# --------------------------------------------------------------------------------------- helpers
def _batch(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, D, generator=g, dtype=torch.float64)
    emb = emb * torch.linspace(0.3, 3.0, b, dtype=torch.float64)[:, None]  # spread norms (AdaFace)
    labels = torch.randint(C, (b,), generator=g)
    return emb, labels


def _head(mg, path, **kw):
    extra = {
        "dense": {},
        "lazy": {},
        "sparse": {"update": "sparse"},
        "chunked": {"chunk_size": 4},
        "chunked-lazy": {"chunk_size": 4},
    }[path]
    head = pfclib.PartialFC(C, D, margin=mg, dtype=torch.float64, seed=2, **extra, **kw)
    if path in ("lazy", "chunked-lazy"):
        head.make_optimizer("sgd", lr=0.1)
    return head


def _dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


def _run(head, emb, labels, index=None, dims=None):
    e = emb.clone().requires_grad_()
    loss = head(e, labels, index=index, dims=dims)
    loss.backward()
    return loss.detach(), e.grad, _dense(head.weight.grad)


def _rows(classes, K):
    return (classes[:, None] * K + torch.arange(K)).reshape(-1)


MARGINS = [
    ArcFace(s=32.0, m=0.5),
    CosFace(s=30.0, m=0.35),
    AdaFace(alpha=1.0, h=1.0, s=32.0),
    NPCFace(s=32.0),
]
MARGIN_IDS = ["arcface", "cosface", "adaface", "npcface"]
DIMS = torch.tensor([0, 2, 3, 5, 8, 9, 12, 15])  # 8 of the 16 dimensions (q = 0.5)


# --------------------------------------------------------- (a) + (b): the reference on every path
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rate", [1.0, 0.4])
@pytest.mark.parametrize("mg", MARGINS, ids=MARGIN_IDS)
@pytest.mark.parametrize("K, q", [(3, 1.0), (1, 0.5), (2, 0.5)], ids=["subcenter3", "unicom05", "both"])
def test_matches_explicit_float64_reference_on_every_path(K, q, mg, rate, path):
    head = _head(mg, path, sample_rate=rate, sub_centers=K, dim_sample_rate=q)
    assert head.weight.shape == (C * K, D)
    emb, labels = _batch(seed=1)
    index = None if rate == 1.0 else torch.unique(torch.cat([labels, torch.tensor([0, 7, 11, 19, 29])]))
    dims = None if q == 1.0 else DIMS
    before = head.centers()  # the centers used (no optimizer step is taken)
    loss, emb_grad, w_grad = _run(head, emb, labels, index, dims)
    cls = torch.arange(C) if index is None else index
    rows = _rows(cls, K)
    e64 = emb.clone().requires_grad_()
    w64 = before[rows].clone().requires_grad_()
    state = (
        (torch.tensor(mg.mean_init, dtype=torch.float64), torch.tensor(mg.std_init, dtype=torch.float64))
        if isinstance(mg, AdaFace)
        else None
    )
    ref = reference(e64, torch.searchsorted(cls, labels), w64, K, mg, dims, state)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(emb_grad, e64.grad, **TOL)
    torch.testing.assert_close(w_grad[rows], w64.grad, **TOL)
    others = torch.ones(C * K, dtype=torch.bool)
    others[rows] = False
    assert torch.count_nonzero(w_grad[others]) == 0  # unsampled classes: all their sub-centers
    if dims is not None:  # the gradient reaches only the kept dimensions
        dropped = torch.ones(D, dtype=torch.bool)
        dropped[dims] = False
        assert torch.count_nonzero(emb_grad[:, dropped]) == 0 and torch.count_nonzero(w_grad[:, dropped]) == 0
        assert torch.count_nonzero(emb_grad[:, dims]) > 0


def test_subcenter_gradient_goes_to_the_argmax_sub_center_only():
    head = pfclib.PartialFC(4, D, margin={"name": "softmax", "s": 4.0}, sub_centers=3, dtype=torch.float64)
    emb, _ = _batch(seed=3, b=1)
    labels = torch.tensor([2])
    with torch.no_grad():  # class 2's sub-center 1 points near the embedding, the others anywhere
        head.weight[6:9] = torch.randn(3, D, dtype=torch.float64)
        head.weight[7] = emb[0] + 0.1 * head.weight[6]
    _, _, w_grad = _run(head, emb, labels)
    per_center = w_grad.abs().sum(dim=1).view(4, 3)
    assert per_center[2].tolist()[0] == 0 and per_center[2].tolist()[2] == 0 and per_center[2, 1] > 0
    assert bool((per_center > 0).sum(dim=1).eq(1).all())  # one sub-center per class gets gradient


@pytest.mark.parametrize("K, q", [(3, 1.0), (1, 0.5), (3, 0.5)])
def test_paths_agree_over_training_steps(K, q):
    """Three SGD steps with the head's own class sampling and dimension draws: torch's SGD on the
    dense gradient, the lazy optimizer on the fused and the chunked paths: the same centers;
    sparse updates equal them at r = 1."""
    results = {}
    for name, rate, kw in [
        ("torch", 0.5, {}),
        ("lazy", 0.5, {}),
        ("chunked-lazy", 0.5, {"chunk_size": 3}),
        ("torch-r1", 1.0, {}),
        ("sparse-r1", 1.0, {"update": "sparse"}),
    ]:
        head = pfclib.PartialFC(
            C, D, sample_rate=rate, sub_centers=K, dim_sample_rate=q, dtype=torch.float64, seed=4, **kw
        )
        if name.startswith("torch"):
            opt = torch.optim.SGD([head.weight], lr=0.5, momentum=0.9, weight_decay=0.01)
        else:
            opt = head.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=0.01)
        losses, dims = [], []
        for step in range(3):
            emb, labels = _batch(seed=10 + step)
            loss = head(emb, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            dims.append(None if head.last_dims is None else head.last_dims.tolist())
        head.sync()
        results[name] = (losses, dims, head.weight.detach().clone(), head.dim_step)
    for a, b in (("torch", "lazy"), ("torch", "chunked-lazy"), ("torch-r1", "sparse-r1")):
        assert results[a][1] == results[b][1]
        assert results[a][0] == pytest.approx(results[b][0], rel=1e-12, abs=1e-12)
        torch.testing.assert_close(results[a][2], results[b][2], rtol=1e-10, atol=1e-12)
    if q < 1:
        draws = results["torch"][1]
        assert (
            all(len(d) == int(q * D) and d == sorted(d) for d in draws)
            and len({tuple(d) for d in draws}) == 3
        )
        assert results["torch"][3] == 3
        expected = torch.randperm(
            D, generator=torch.Generator().manual_seed(derive_seed(4, SEED_DIM_SAMPLE, 1))
        )
        assert draws[1] == sorted(expected[: int(q * D)].tolist())


def test_eval_mode_uses_every_dimension_and_does_not_draw():
    head = pfclib.PartialFC(C, D, dim_sample_rate=0.5, dtype=torch.float64)
    full = pfclib.PartialFC(C, D, dtype=torch.float64)
    emb, labels = _batch()
    head.eval()
    full.eval()
    assert torch.equal(head(emb, labels), full(emb, labels))
    assert head.dim_step == 0 and head.last_dims is None
    head.train()
    head(emb, labels)
    assert head.dim_step == 1 and head.last_dims.numel() == 8


# ------------------------------------------------------------------ (e): the defaults are unchanged
@pytest.mark.parametrize("path", PATHS)
def test_k1_q1_is_the_plain_head_bit_for_bit(path):
    emb, labels = _batch(seed=5)
    out = []
    for kw in ({}, {"sub_centers": 1, "dim_sample_rate": 1.0}):
        head = _head("arcface", path, sample_rate=0.5, **kw)
        loss, emb_grad, w_grad = _run(head, emb, labels)
        out.append((loss, emb_grad, w_grad, head.last_index, head.state_dict(), head.full_state_dict()))
    (l0, e0, w0, i0, s0, f0), (l1, e1, w1, i1, s1, f1) = out
    assert torch.equal(l0, l1) and torch.equal(e0, e1) and torch.equal(w0, w1) and torch.equal(i0, i1)
    assert s0.keys() == s1.keys() and f0.keys() == f1.keys()
    assert (
        "sub_centers" not in f0
        and "dim_step" not in f0
        and set(s0["_extra_state"]) == set(s1["_extra_state"])
    )


# ------------------------------------------------------------------------------------- (f): errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sub_centers": 0}, r"sub_centers must be a positive integer, got 0"),
        ({"sub_centers": -2}, r"sub_centers must be a positive integer, got -2"),
        ({"sub_centers": 2.5}, r"sub_centers must be a positive integer, got 2\.5"),
        ({"sub_centers": "3"}, r"sub_centers must be a positive integer, got '3'"),
        ({"sub_centers": True}, r"sub_centers must be a positive integer, got True"),
        ({"dim_sample_rate": 0.0}, r"dim_sample_rate must be a number in \(0, 1\], got 0\.0"),
        ({"dim_sample_rate": 1.5}, r"dim_sample_rate must be a number in \(0, 1\], got 1\.5"),
        ({"dim_sample_rate": "0.5"}, r"dim_sample_rate must be a number in \(0, 1\], got '0\.5'"),
        ({"dim_sample_rate": 0.05}, r"dim_sample_rate=0\.05 keeps int\(0\.05 \* 16\) = 0 of the 16"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pfclib.PartialFC(C, D, **kwargs)


def test_bad_dims_and_config_values_are_refused():
    head = pfclib.PartialFC(C, D, dim_sample_rate=0.5)
    emb, labels = _batch()
    with pytest.raises(ValueError, match="sorted ascending"):
        head(emb.float(), labels, dims=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        head(emb.float(), labels, dims=torch.tensor([1, 16]))
    with pytest.raises(ValueError, match="needs dim_sample_rate < 1"):
        pfclib.PartialFC(C, D)(emb.float(), labels, dims=DIMS)
    from pfclib.config import HeadConfig

    with pytest.raises(ValueError, match="head.sub_centers must be a positive integer, got 0"):
        HeadConfig(sub_centers=0)
    with pytest.raises(ValueError, match=r"head.dim_sample_rate must be a number in \(0, 1\], got 2"):
        HeadConfig(dim_sample_rate=2)
    assert HeadConfig(sub_centers=3, dim_sample_rate=0.5).sub_centers == 3


# ----------------------------------------------------------------------- (d): state and re-sharding
def _train(head, opt, steps, seed=7):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        emb = torch.randn(8, D, generator=gen, dtype=head.weight.dtype)
        labels = torch.randint(0, C, (8,), generator=gen)
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _new(seed=3, **kw):
    return pfclib.PartialFC(
        C, D, sample_rate=0.5, sub_centers=3, dim_sample_rate=0.5, track_updates=True, seed=seed, **kw
    )


@pytest.mark.parametrize("update, kind", [("dense", "sgd"), ("sparse", "adamw"), ("dense", "adamw")])
def test_full_state_and_state_dict_round_trips_continue_bitwise(update, kind, tmp_path):
    head = _new(update=update)
    opt = head.make_optimizer(kind, lr=0.1)
    _train(head, opt, 3)
    full = head.full_state_dict(opt)
    assert full["weight"].shape == (C * 3, D) and full["counters"]["active"].shape == (C,)
    assert full["sub_centers"] == 3 and full["dim_step"] == 3 and full["dim_sample_rate"] == 0.5
    torch.save(full, tmp_path / "full.pt")
    sd = head.state_dict()
    other = _new(seed=99, update=update)
    other_opt = other.make_optimizer(kind, lr=0.5)
    other.load_full_state_dict(torch.load(tmp_path / "full.pt", weights_only=True), other_opt)
    third = _new(seed=98, update=update)
    third.load_state_dict(sd)
    assert third.dim_step == 3
    assert _train(head, opt, 2, seed=8) == _train(other, other_opt, 2, seed=8)
    head.sync()
    other.sync()
    assert torch.equal(head.weight, other.weight) and head.dim_step == other.dim_step == 5
    assert torch.equal(head.active_updates, other.active_updates)
    with pytest.raises(ValueError, match="sub_centers=3; this head has sub_centers=2"):
        pfclib.PartialFC(C, D, sub_centers=2).load_full_state_dict(full)


def test_the_class_view_and_dominant_sub_centers():
    head = pfclib.PartialFC(5, D, sub_centers=3, dtype=torch.float64)
    view = head.class_centers()
    assert view.shape == (5, 3, D) and torch.equal(view[2, 1], head.weight[7])
    emb = torch.stack([head.weight[7].detach(), head.weight[7].detach() * 2, head.weight[3].detach()])
    assert head.dominant_centers(emb, torch.tensor([2, 2, 1])).tolist() == [-1, 0, 1, -1, -1]


def _write_on_ranks(rank, world_size, folder):
    head = _new()
    opt = head.make_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    _train(head, opt, 3)  # the same inputs on every rank: the global batch is their union
    path = folder / f"rank_{rank:05d}.pt"
    torch.save(head_state.shard_state_dict(head, opt), path)
    entry = {"file": path.name, "start": head.start, "end": head.start + head.n_local, "bytes": 0}
    entries = [None] * world_size
    torch.distributed.all_gather_object(entries, entry)
    return head_state.sharded_manifest(head, entries, "."), head.full_state_dict(opt)


def _read_on_ranks(rank, world_size, folder, manifest, full):
    a = _new(seed=5)
    a_opt = a.make_optimizer("sgd", lr=0.1, momentum=0.9)
    head_state.load_sharded_state(a, manifest, folder, a_opt)
    b = _new(seed=6)
    b_opt = b.make_optimizer("sgd", lr=0.1, momentum=0.9)
    b.load_full_state_dict(full, b_opt)
    return a.full_state_dict(a_opt), b.full_state_dict(b_opt), (a.weight.shape[0], a.start, a.n_local)


def _assert_same(a, b):
    for key in ("weight", "sub_centers", "dim_step", "dim_sample_rate"):
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    for k in ("active", "passive"):
        assert torch.equal(a["counters"][k], b["counters"][k])
    assert torch.equal(a["optimizer"]["state"]["momentum_buffer"], b["optimizer"]["state"]["momentum_buffer"])


@pytest.mark.distributed
def test_two_ranks_write_one_and_three_ranks_read(tmp_path):
    (manifest, full), (_, full1) = run_gloo(_write_on_ranks, 2, tmp_path)
    assert [(e["start"], e["end"]) for e in manifest["shards"]] == [(0, 15), (15, 30)]
    assert full["weight"].shape == (C * 3, D) and full["dim_step"] == 3
    _assert_same(full, full1)
    _assert_same(head_state.read_sharded_state(manifest, tmp_path), full)
    # 2 -> 1: one process takes every class with its three rows
    one = _new(seed=5)
    one_opt = one.make_optimizer("sgd", lr=0.1, momentum=0.9)
    head_state.load_sharded_state(one, manifest, tmp_path, one_opt)
    _assert_same(one.full_state_dict(one_opt), full)
    one.load_full_state_dict(full, one_opt)
    _assert_same(one.full_state_dict(one_opt), full)
    # 1 -> 3 (through the 2-rank files and the full state): classes [0, 10), [10, 20), [20, 30)
    results = run_gloo(_read_on_ranks, 3, tmp_path, manifest, full)
    assert [r[2] for r in results] == [(30, 0, 10), (30, 10, 10), (30, 20, 10)]
    for sharded, whole, _ in results:
        _assert_same(sharded, full)
        _assert_same(whole, full)
