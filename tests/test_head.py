import math

import pytest
import torch
import torch.nn.functional as F

import pfclib
from pfclib.head import init_centers
from pfclib.margins import ArcFace, CombinedMargin, CosFace

C, D, B = 50, 16, 12


def reference_loss(emb, labels, centers, margin_fn):
    """Explicit dense reference: softmax over the given centers with the margin on each row's target."""
    x = emb / emb.norm(dim=1, keepdim=True)
    w = centers / centers.norm(dim=1, keepdim=True)
    cos = (x @ w.T).clamp(-1, 1)
    rows = torch.arange(len(labels))
    logits = margin_fn.s * cos
    if margin_fn.filter_threshold is not None:
        noisy = (cos.detach() > margin_fn.filter_threshold) & (F.one_hot(labels, len(centers)) == 0)
        logits = torch.where(noisy, torch.zeros_like(logits), logits)
    c_t = cos[rows, labels]
    if isinstance(margin_fn, CosFace):
        t = c_t - margin_fn.m
    else:
        m1, m2, m3 = (
            (1.0, margin_fn.m, 0.0)
            if isinstance(margin_fn, ArcFace)
            else (margin_fn.m1, margin_fn.m2, margin_fn.m3)
        )
        t = torch.cos(m1 * torch.acos(c_t) + m2) - m3
        if margin_fn.straight_through:
            t = c_t + (t - c_t).detach()
    onehot = F.one_hot(labels, len(centers)).bool()
    logits = torch.where(onehot, margin_fn.s * t[:, None], logits)
    return F.cross_entropy(logits, labels)


def _batch(dtype=torch.float64, seed=0, b=B, c=C):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, D, generator=g, dtype=dtype)
    labels = torch.randint(c, (b,), generator=g)
    return emb, labels


MARGINS = [
    ArcFace(s=64.0, m=0.5),
    ArcFace(s=64.0, m=0.5, straight_through=True),
    CosFace(s=30.0, m=0.4),
    CombinedMargin(s=32.0, m1=1.0, m2=0.3, m3=0.2),
    ArcFace(s=16.0, m=0.5, filter_threshold=0.2),
]


@pytest.mark.parametrize(
    "margin", MARGINS, ids=lambda m: f"{m.name}{'_st' if getattr(m, 'straight_through', 0) else ''}"
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rate_matches_dense_reference(margin, dtype):
    head = pfclib.PartialFC(C, D, sample_rate=1.0, margin=margin, dtype=dtype)
    emb, labels = _batch(dtype)
    emb.requires_grad_()
    loss = head(emb, labels)
    loss.backward()
    emb64 = emb.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    ref = reference_loss(emb64, labels, w64, margin)
    ref.backward()
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(emb.grad.double(), emb64.grad, **tol)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, **tol)


@pytest.mark.parametrize("update", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampled_matches_reference_restricted_to_the_sampled_set(update, dtype):
    head = pfclib.PartialFC(C, D, sample_rate=0.3, update=update, margin="arcface", dtype=dtype, seed=3)
    emb, labels = _batch(dtype, seed=1)
    emb.requires_grad_()
    head(emb, labels).backward()
    index = head.last_index
    assert index.numel() == max(int(0.3 * C), labels.unique().numel())
    assert set(labels.tolist()) <= set(index.tolist())
    emb64 = emb.detach().double().requires_grad_()
    w64 = head.weight.detach().double()[index].requires_grad_()
    remapped = torch.searchsorted(index, labels)
    ref = reference_loss(emb64, remapped, w64, head.margin)
    ref.backward()
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    loss = head(emb.detach(), labels, index=index)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(emb.grad.double(), emb64.grad, **tol)
    grad = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    torch.testing.assert_close(grad[index].double(), w64.grad, **tol)
    unsampled = torch.ones(C, dtype=torch.bool)
    unsampled[index] = False
    assert torch.count_nonzero(grad[unsampled]) == 0


def test_fixed_index_fixes_the_sampled_set_and_generator_state_reproduces_it():
    head = pfclib.PartialFC(C, D, sample_rate=0.2, seed=7)
    emb, labels = _batch(torch.float32)
    state = head.generator.get_state()
    head(emb, labels)
    first = head.last_index.clone()
    head.generator.set_state(state)
    head(emb, labels)
    assert torch.equal(head.last_index, first)
    fixed = torch.unique(torch.cat([labels, torch.tensor([0, 49])]))
    head(emb, labels, index=fixed)
    assert torch.equal(head.last_index, fixed)
    with pytest.raises(ValueError, match="missing from the sampled index set"):
        head(emb, labels, index=torch.tensor([0, 49]))
    with pytest.raises(ValueError, match="sorted ascending"):
        head(emb, labels, index=fixed.flip(0))


@pytest.mark.parametrize("margin", ["arcface", "cosface", {"name": "arcface_st", "filter_threshold": 0.1}])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_unchunked(margin, chunk_size):
    emb, labels = _batch(torch.float64, seed=2)
    results = []
    for chunk in (None, chunk_size):
        head = pfclib.PartialFC(
            C, D, sample_rate=0.6, margin=margin, chunk_size=chunk, dtype=torch.float64, seed=1
        )
        e = emb.clone().requires_grad_()
        loss = head(e, labels)
        loss.backward()
        results.append((loss.detach(), e.grad, head.weight.grad, head.last_index))
    (l0, e0, w0, i0), (l1, e1, w1, i1) = results
    assert torch.equal(i0, i1)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e1, e0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1, w0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings_give_fp32_loss_and_own_dtype_grad(dtype):
    head = pfclib.PartialFC(C, D, sample_rate=1.0)
    emb, labels = _batch(torch.float32)
    half = emb.to(dtype).requires_grad_()
    loss = head(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == dtype
    ref_emb = half.detach().float().requires_grad_()
    ref = pfclib.PartialFC(C, D, sample_rate=1.0)(ref_emb, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(half.grad.float(), ref_emb.grad.to(dtype).float())
    assert head.weight.dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_logits_stay_fp32_inside_autocast(chunk_size):
    head = pfclib.PartialFC(C, D, sample_rate=1.0, chunk_size=chunk_size)
    emb, labels = _batch(torch.float32)
    ref = head(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(emb, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_inputs_are_not_mutated():
    head = pfclib.PartialFC(C, D, sample_rate=0.5, update="sparse", chunk_size=8)
    emb, labels = _batch(torch.float32)
    e0, l0 = emb.clone(), labels.clone()
    emb.requires_grad_()
    head(emb, labels).backward()
    assert torch.equal(emb.detach(), e0) and torch.equal(labels, l0)


@pytest.mark.parametrize("path", ["dense-grad", "lazy", "sparse", "chunked"])
def test_arcface_gradient_finite_when_embedding_equals_its_center(path):
    # cosine exactly +1 at the target (and -1 for the negated row) on every forward path
    kw = {"dense-grad": {}, "lazy": {}, "sparse": {"update": "sparse"}, "chunked": {"chunk_size": 4}}[path]
    head = pfclib.PartialFC(C, D, margin="arcface", **kw)
    if path == "lazy":
        head.make_optimizer("sgd")
    labels = torch.tensor([3, 3, 5, 6])
    emb = head.weight.detach()[labels] * 5.0
    emb[3] = -emb[3]
    emb.requires_grad_()
    loss = head(emb, labels)
    loss.backward()
    grad = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and torch.isfinite(grad).all()
    assert head.weight.grad.is_sparse == (path in ("lazy", "sparse"))


def test_init_is_independent_of_the_sharding():
    full = init_centers(0, 10_000, 8, seed=5, dtype=torch.float32)
    part = init_centers(4000, 5000, 8, seed=5, dtype=torch.float32)
    assert torch.equal(full[4000:9000], part)
    assert abs(float(full.std()) - 0.01) < 1e-3
    assert not torch.equal(init_centers(0, 10, 8, seed=6, dtype=torch.float32), full[:10])


def test_update_counters():
    head = pfclib.PartialFC(10, D, sample_rate=0.5, track_updates=True)
    emb = torch.randn(4, D)
    labels = torch.tensor([1, 1, 4, 7])
    head(emb, labels)
    index = head.last_index.tolist()
    assert head.active_updates.tolist() == [int(c in (1, 4, 7)) for c in range(10)]
    assert head.passive_updates.tolist() == [int(c in index and c not in (1, 4, 7)) for c in range(10)]
    head.eval()
    head(emb, labels)
    assert int(head.active_updates.sum()) == 3  # evaluation forwards are not counted
    head.train()
    full = pfclib.PartialFC(10, D, track_updates=True)
    full(emb, labels)
    assert full.passive_updates.tolist() == [int(c not in (1, 4, 7)) for c in range(10)]


def test_passive_update_rate_is_about_r():
    head = pfclib.PartialFC(1000, 8, sample_rate=0.1, track_updates=True)
    emb = torch.randn(4, 8)
    for _ in range(200):
        head(emb, torch.tensor([0, 1, 2, 3]))
    counts = head.passive_updates[4:].double()
    rate = counts.mean().item() / 200
    p = (100 - 4) / 996
    assert rate == pytest.approx(p, rel=0.02)
    assert head.active_updates[:4].tolist() == [200] * 4
    # every negative class is drawn at that rate, not only on average: per class ~ Binomial(200, p),
    # mean 19.3, sd 4.2 (P(a class never drawn) = 1.5e-9); negatives fixed to some classes, or a
    # range never drawn, give counts of 0 and of 200
    assert counts.min() >= 1 and counts.max() <= 200 * p + 6 * (200 * p * (1 - p)) ** 0.5
    assert float(counts[:498].mean()) == pytest.approx(float(counts[498:].mean()), rel=0.05)


def _errors():
    return [
        (lambda h: h(torch.randn(3, D), torch.tensor([0, 1, C])), ValueError, rf"\[0, {C}\).*\[{C}\]"),
        (lambda h: h(torch.randn(3, D), torch.tensor([0, -2, 1])), ValueError, r"out-of-range values \[-2\]"),
        (
            lambda h: h(torch.randn(3, D), torch.tensor([0.0, 1.0, 2.0])),
            TypeError,
            "integer tensor, got dtype torch.float32",
        ),
        (lambda h: h(torch.randn(3, D), torch.tensor([True, False, True])), TypeError, "integer tensor"),
        (
            lambda h: h(torch.tensor([[math.nan] * D, [0.0] * D]), torch.tensor([0, 1])),
            ValueError,
            r"non-finite.*\[0\]",
        ),
        (
            lambda h: h(torch.tensor([[1.0] * D, [math.inf] * D]), torch.tensor([0, 1])),
            ValueError,
            r"non-finite.*\[1\]",
        ),
        (lambda h: h(torch.randn(0, D), torch.zeros(0, dtype=torch.long)), ValueError, "empty batch"),
        (
            lambda h: h(torch.randn(3, D + 1), torch.tensor([0, 1, 2])),
            ValueError,
            rf"\(B, {D}\), got \(3, {D + 1}\)",
        ),
        (lambda h: h(torch.randn(3, D), torch.tensor([0, 1])), ValueError, r"labels must have shape \(3,\)"),
        (lambda h: h(torch.randint(5, (3, D)), torch.tensor([0, 1, 2])), TypeError, "floating-point"),
    ]


@pytest.mark.parametrize("i", range(len(_errors())))
def test_input_errors(i):
    call, exc, match = _errors()[i]
    with pytest.raises(exc, match=match):
        call(pfclib.PartialFC(C, D))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"update": "lazy"}, "update must be"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"dtype": torch.float16}, "dtype of the centers"),
        ({"margin": "nope"}, "unknown margin"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pfclib.PartialFC(C, D, **kwargs)


def test_state_dict_round_trip_includes_generator_and_counters(tmp_path):
    head = pfclib.PartialFC(C, D, sample_rate=0.2, track_updates=True, seed=1)
    emb, labels = _batch(torch.float32)
    head(emb, labels)
    path = tmp_path / "head.pt"
    torch.save(head.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    other = pfclib.PartialFC(C, D, sample_rate=0.2, track_updates=True, seed=99)
    other.load_state_dict(sd)
    assert torch.equal(other.weight, head.weight)
    assert torch.equal(other.passive_updates, head.passive_updates)
    head(emb, labels)
    other(emb, labels)
    assert torch.equal(other.last_index, head.last_index)
    with pytest.raises(ValueError, match="full_state_dict"):
        pfclib.PartialFC(C + 1, D, sample_rate=0.2, track_updates=True).load_state_dict(sd, strict=False)


@pytest.mark.parametrize("update, kind", [("dense", "sgd"), ("sparse", "adamw"), ("sparse", "sgd")])
def test_full_state_dict_round_trip_with_optimizer(update, kind, tmp_path):
    head = pfclib.PartialFC(C, D, sample_rate=0.5, update=update, track_updates=True)
    opt = head.make_optimizer(kind, lr=0.1)
    emb, labels = _batch(torch.float32)
    head(emb, labels).backward()
    opt.step()
    path = tmp_path / "full.pt"
    torch.save(head.full_state_dict(opt), path)
    full = torch.load(path, weights_only=True)
    assert full["weight"].shape == (C, D)
    other = pfclib.PartialFC(C, D, sample_rate=0.5, update=update, track_updates=True, seed=5)
    other_opt = other.make_optimizer(kind, lr=0.5)
    other.load_full_state_dict(full, other_opt)
    for h, o in ((head, opt), (other, other_opt)):
        h.zero_grad()
        h(emb, labels).backward()
        o.step()
    assert torch.equal(other.weight, head.weight)
    assert torch.equal(other.active_updates, head.active_updates)


def test_full_state_dict_moves_between_dense_and_sparse_adamw():
    dense = pfclib.PartialFC(C, D, update="dense")
    opt = dense.make_optimizer("adamw", lr=0.01)
    emb, labels = _batch(torch.float32)
    dense(emb, labels).backward()
    opt.step()
    sparse = pfclib.PartialFC(C, D, update="sparse")
    sopt = sparse.make_optimizer("adamw", lr=0.01)
    sparse.load_full_state_dict(dense.full_state_dict(opt), sopt)
    assert sopt.state[sparse.weight]["step"].tolist() == [1] * C
    with pytest.raises(ValueError, match="cannot load it into LazySGD"):
        dense.load_full_state_dict(dense.full_state_dict(opt), dense.make_optimizer("sgd"))
