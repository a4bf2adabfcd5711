import io

import pytest
import torch

import pfclib
from pfclib.optim import SparseAdamW, SparseSGD

C, D, B = 40, 8, 6


def _batches(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, D, generator=g, dtype=dtype), torch.randint(C, (B,), generator=g)) for _ in range(n)
    ]


def _train(update, kind, sample_rate, steps=3, accumulate=1, **opt_kwargs):
    head = pfclib.PartialFC(C, D, sample_rate=sample_rate, update=update, dtype=torch.float64, seed=4)
    opt = head.make_optimizer(kind, **opt_kwargs)
    for i, (emb, labels) in enumerate(_batches(steps * accumulate)):
        head(emb, labels).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return head, opt


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("sgd", {"lr": 0.5, "momentum": 0.9, "weight_decay": 5e-2}),
        ("sgd", {"lr": 0.5, "momentum": 0.9, "weight_decay": 5e-2, "nesterov": True}),
        ("adamw", {"lr": 0.05, "weight_decay": 0.1, "betas": (0.8, 0.95), "eps": 1e-6}),
    ],
)
def test_sparse_equals_dense_at_full_rate(kind, kwargs):
    # fp64; the sparse path differentiates the normalisation in fused form (pfclib.head.sampled_cosine),
    # so after several steps the two agree to rounding (~1e-13), not bit for bit
    dense, dopt = _train("dense", kind, 1.0, **kwargs)
    sparse, sopt = _train("sparse", kind, 1.0, **kwargs)
    assert isinstance(sopt, SparseAdamW if kind == "adamw" else SparseSGD)
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-10, atol=1e-12)
    key = "exp_avg" if kind == "adamw" else "momentum_buffer"
    torch.testing.assert_close(
        sopt.state[sparse.weight][key], dopt.state[dense.weight][key], rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sparse_equals_dense_for_plain_sgd_at_any_rate(accumulate):
    dense, _ = _train("dense", "sgd", 0.3, accumulate=accumulate, lr=0.5, momentum=0.0, weight_decay=0.0)
    sparse, _ = _train("sparse", "sgd", 0.3, accumulate=accumulate, lr=0.5, momentum=0.0, weight_decay=0.0)
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-10, atol=1e-12)


def test_sparse_freezes_unsampled_rows_while_dense_moves_them():
    head = pfclib.PartialFC(C, D, sample_rate=0.25, update="sparse", dtype=torch.float64)
    opt = head.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=0.1)
    (e1, l1), (e2, l2) = _batches(2)
    head(e1, l1).backward()
    assert head.weight.grad.is_sparse and head.weight.grad._nnz() == head.last_index.numel()
    opt.step()
    opt.zero_grad()
    first = head.last_index
    before = head.weight.detach().clone()
    buf_before = opt.state[head.weight]["momentum_buffer"].clone()
    head(e2, l2).backward()
    opt.step()
    frozen = torch.ones(C, dtype=torch.bool)
    frozen[head.last_index] = False
    assert torch.equal(head.weight[frozen], before[frozen])
    assert torch.equal(opt.state[head.weight]["momentum_buffer"][frozen], buf_before[frozen])
    assert not torch.equal(head.weight[~frozen], before[~frozen])
    # dense semantics: momentum and decay move rows sampled at step 1 but not at step 2
    dense, _ = _train("dense", "sgd", 0.25, steps=2, lr=0.5, momentum=0.9, weight_decay=0.1)
    moved_by_momentum = torch.zeros(C, dtype=torch.bool)
    moved_by_momentum[first] = True
    moved_by_momentum &= frozen
    if moved_by_momentum.any():
        init = pfclib.PartialFC(C, D, dtype=torch.float64, seed=4).weight.detach()
        assert not torch.equal(dense.weight[moved_by_momentum], init[moved_by_momentum])


def test_sparse_adamw_row_equals_adamw_run_on_its_own_steps():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    ref = torch.nn.Parameter(p.detach()[2:3].clone())
    opt = SparseAdamW([p], lr=0.1, weight_decay=0.2)
    ref_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.2)
    for rows in ([0, 2], [1, 3], [2, 4], [2]):
        g = torch.randn(len(rows), 3, dtype=torch.float64)
        p.grad = torch.sparse_coo_tensor(torch.tensor([rows]), g, p.shape, check_invariants=True)
        opt.step()
        if 2 in rows:
            ref.grad = g[rows.index(2)][None]
            ref_opt.step()
    torch.testing.assert_close(p.detach()[2:3], ref.detach(), rtol=1e-12, atol=1e-14)
    assert opt.state[p]["step"].tolist() == [1, 1, 3, 1, 1]


def test_sparse_sgd_sums_duplicate_rows_and_matches_torch_sgd_on_touched_rows():
    p = torch.nn.Parameter(torch.arange(12, dtype=torch.float64).view(4, 3))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = SparseSGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.ones(3, 3, dtype=torch.float64)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 3]]), g, p.shape, check_invariants=True)
    dense_grad = torch.zeros(4, 3, dtype=torch.float64)
    dense_grad[1] = 2.0
    dense_grad[3] = 1.0
    ref.grad = dense_grad
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(p.detach()[[1, 3]], ref.detach()[[1, 3]], rtol=1e-14, atol=1e-14)
    assert torch.equal(p.detach()[[0, 2]], torch.arange(12, dtype=torch.float64).view(4, 3)[[0, 2]])


def test_sparse_optimizer_state_dict_round_trip():
    head, opt = _train("sparse", "adamw", 0.3, lr=0.05)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    other = pfclib.PartialFC(C, D, sample_rate=0.3, update="sparse", dtype=torch.float64)
    other.load_state_dict(head.state_dict())
    other_opt = other.make_optimizer("adamw", lr=0.05)
    other_opt.load_state_dict(sd)
    assert other_opt.state[other.weight]["step"].dtype == torch.int64
    emb, labels = _batches(1, seed=9)[0]
    for h, o in ((head, opt), (other, other_opt)):
        h(emb, labels).backward()
        o.step()
    assert torch.equal(head.weight, other.weight)


def test_optimizer_argument_errors():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="momentum must be in"):
        SparseSGD([p], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SparseAdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="unknown optimizer kind 'lamb'"):
        pfclib.PartialFC(4, 2).make_optimizer("lamb")


# --- memory-lean sparse path: fused gather -> normalise -> cosine, chunked row updates ---------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("row_chunk", [3, 8192])
def test_sampled_cosine_matches_explicit_reference(monkeypatch, dtype, row_chunk):
    import pfclib.fused as head_mod

    monkeypatch.setattr(head_mod, "_ROW_CHUNK", row_chunk)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 6, generator=g, dtype=dtype, requires_grad=True)
    x = torch.nn.functional.normalize(torch.randn(5, 6, generator=g, dtype=dtype), dim=1).requires_grad_()
    index = torch.tensor([0, 2, 3, 7, 11, 12, 19])
    up = torch.randn(5, index.numel(), generator=g, dtype=dtype)

    cos = head_mod.sampled_cosine(x, weight, index)
    (cos * up).sum().backward()
    grad_w, grad_x = weight.grad.to_dense(), x.grad
    assert weight.grad.is_sparse and weight.grad._nnz() == index.numel()

    w_ref = weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = x_ref @ torch.nn.functional.normalize(w_ref[index], dim=1).T
    (ref * up).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos, ref, **tol)
    torch.testing.assert_close(grad_x, x_ref.grad, **tol)
    torch.testing.assert_close(grad_w, w_ref.grad, **tol)
    unsampled = torch.ones(20, dtype=torch.bool)
    unsampled[index] = False
    assert bool((grad_w[unsampled] == 0).all())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_row_chunked_sparse_update_equals_one_chunk(monkeypatch, kind):
    import pfclib.optim as optim_mod
    from pfclib.head import PartialFC

    def run(chunk):
        monkeypatch.setattr(optim_mod, "_ROW_CHUNK", chunk)
        head = PartialFC(50, 8, sample_rate=0.5, update="sparse", seed=3)
        opt = head.make_optimizer(kind, lr=0.1, momentum=0.9, weight_decay=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(6, 8, generator=g)
            y = torch.randint(0, 50, (6,), generator=g)
            head(x, y).backward()
            opt.step()
            opt.zero_grad()
        return head.weight.detach().clone(), {k: v.clone() for k, v in opt.state[head.weight].items()}

    w_small, s_small = run(4)
    w_big, s_big = run(1 << 20)
    assert torch.equal(w_small, w_big)
    for key in s_big:
        assert torch.equal(s_small[key], s_big[key]), key
