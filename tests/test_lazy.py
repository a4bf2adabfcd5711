"""LazySGD (the default head's SGD) against ``torch.optim.SGD`` on the dense, zero-padded gradient.

The reference is always torch's own optimizer on the full matrix; the lazy one sees only the rows
that have a gradient. float64 runs compare over hundreds of steps at rounding tolerance; float32
over a few steps (training at s = 64 is chaotic, so longer fp32 runs drift apart at 1e-7 -> 1e-4).
"""

import pytest
import torch

import pfclib
from pfclib.multiproc import run_gloo
from pfclib.optim import LazySGD
from pfclib.schedule import WarmupPolyDecay

TOL64 = {"rtol": 1e-11, "atol": 1e-13}

HYPER = [
    {"momentum": 0.9, "weight_decay": 5e-2},
    {"momentum": 0.9, "weight_decay": 5e-2, "nesterov": True},
    {"momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-2},
    {"momentum": 0.0, "weight_decay": 1e-2},
    {"momentum": 0.9, "weight_decay": 0.0},
]


def _schedule(steps):
    sched = WarmupPolyDecay(steps, steps // 10, 2.0, 0.0)
    return [0.5 * sched(t) for t in range(steps)]


def _run_pair(hyper, steps, horizon, rows=30, dim=6, rate=0.2, idle=(), seed=0, check_every=0):
    """Same random row-sparse gradients into torch.optim.SGD (dense) and LazySGD (sparse); rows in
    ``idle`` never get a gradient. Returns both parameters and optimizers (lazy one not flushed)."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    ref = torch.nn.Parameter(init.clone())
    lazy = torch.nn.Parameter(init.clone())
    ref_opt = torch.optim.SGD([ref], lr=0.5, **hyper)
    lazy_opt = LazySGD([lazy], lr=0.5, horizon=horizon, **hyper)
    allowed = torch.tensor([r for r in range(rows) if r not in set(idle)])
    for t, lr in enumerate(_schedule(steps)):
        pick = allowed[torch.rand(allowed.numel(), generator=g) < rate]
        values = torch.randn(pick.numel(), dim, generator=g, dtype=torch.float64)
        dense = torch.zeros(rows, dim, dtype=torch.float64)
        dense[pick] = values
        ref.grad = dense
        lazy.grad = torch.sparse_coo_tensor(pick[None], values, (rows, dim))
        for opt in (ref_opt, lazy_opt):
            opt.param_groups[0]["lr"] = lr
            opt.step()
        if check_every and t % check_every == 0:
            current = lazy_opt.current_rows(lazy, torch.arange(rows))
            torch.testing.assert_close(current, ref.detach(), **TOL64)
    return ref, ref_opt, lazy, lazy_opt


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
@pytest.mark.parametrize("horizon", [7, 1024])
def test_lazy_sgd_equals_torch_sgd_over_hundreds_of_steps(hyper, horizon):
    ref, ref_opt, lazy, lazy_opt = _run_pair(hyper, 300, horizon, idle=(3,), check_every=25)
    lazy_opt.flush()
    torch.testing.assert_close(lazy.detach(), ref.detach(), **TOL64)
    if hyper["momentum"]:
        torch.testing.assert_close(
            lazy_opt.state[lazy]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"], **TOL64
        )
    # the idle row (never a gradient) moved by decay and momentum, and lazily by the same amount
    init = torch.randn(30, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if hyper["weight_decay"]:
        assert (lazy.detach()[3] - init[3]).abs().min() > 1e-3


def test_catch_up_after_thousands_of_idle_steps_is_stable():
    # one window of 5000 steps: the idle row is carried by a product of 5000 step matrices
    # (built by left multiplication, no inverse) and still lands on torch's value
    hyper = {"momentum": 0.9, "weight_decay": 5e-4}
    ref, _, lazy, lazy_opt = _run_pair(hyper, 5000, 8192, rows=8, dim=4, rate=0.5, idle=(0, 5))
    assert lazy_opt._pending[lazy]["now"] == 5000  # no flush happened: the long product was used
    current = lazy_opt.current_rows(lazy, torch.tensor([0, 5]))
    torch.testing.assert_close(current, ref.detach()[[0, 5]], rtol=1e-10, atol=1e-14)
    lazy_opt.flush()
    torch.testing.assert_close(lazy.detach(), ref.detach(), rtol=1e-10, atol=1e-14)


def test_current_rows_reads_without_changing_anything():
    _, _, lazy, opt = _run_pair(HYPER[0], 40, 1024)
    before = (
        lazy.detach().clone(),
        opt.state[lazy]["momentum_buffer"].clone(),
        opt._pending[lazy]["last"].clone(),
    )
    opt.current_rows(lazy, torch.arange(lazy.shape[0]))
    after = (lazy.detach(), opt.state[lazy]["momentum_buffer"], opt._pending[lazy]["last"])
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_state_dict_is_torch_sgd_state_and_moves_both_ways():
    ref, ref_opt, lazy, lazy_opt = _run_pair(HYPER[2], 50, 1024)
    sd = lazy_opt.state_dict()  # flushes
    torch.testing.assert_close(lazy.detach(), ref.detach(), **TOL64)
    # lazy -> torch and torch -> lazy, then both continue on the same gradients
    twin_ref = torch.nn.Parameter(lazy.detach().clone())
    twin_ref_opt = torch.optim.SGD([twin_ref], lr=0.1, momentum=0.8, dampening=0.3, weight_decay=1e-2)
    twin_ref_opt.load_state_dict(sd)
    twin_lazy = torch.nn.Parameter(ref.detach().clone())
    twin_lazy_opt = LazySGD([twin_lazy], lr=0.1, momentum=0.8, dampening=0.3, weight_decay=1e-2)
    twin_lazy_opt.load_state_dict(ref_opt.state_dict())
    g = torch.Generator().manual_seed(9)
    for _ in range(20):
        pick = torch.randperm(lazy.shape[0], generator=g)[:5].sort().values
        values = torch.randn(5, lazy.shape[1], generator=g, dtype=torch.float64)
        dense = torch.zeros_like(lazy.detach())
        dense[pick] = values
        twin_ref.grad = dense
        twin_lazy.grad = torch.sparse_coo_tensor(pick[None], values, lazy.shape)
        twin_ref_opt.step()
        twin_lazy_opt.step()
    twin_lazy_opt.flush()
    torch.testing.assert_close(twin_lazy.detach(), twin_ref.detach(), **TOL64)


def test_lazy_sgd_argument_errors():
    p = [torch.nn.Parameter(torch.zeros(3, 2))]
    with pytest.raises(ValueError, match="dampening must be in"):
        LazySGD(p, lr=0.1, momentum=0.9, dampening=1.5)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0 and dampening = 0"):
        LazySGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="horizon must be a positive integer, got 0"):
        LazySGD(p, lr=0.1, horizon=0)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        LazySGD(p, lr=float("nan"))


# ------------------------------------------------------------------ through the head
C, D, B = 50, 8, 6


def _batches(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, D, generator=g, dtype=dtype), torch.randint(C, (B,), generator=g)) for _ in range(n)
    ]


def _head_pair(dtype, steps, nesterov=False, save_at=None):
    """The default head (lazy SGD) and the same head with a hand-built torch.optim.SGD (dense
    gradient), sampling the same classes, under a changing lr."""
    kw = {"sample_rate": 0.2, "margin": {"name": "cosface", "s": 16.0, "m": 0.2}, "dtype": dtype, "seed": 3}
    lazy = pfclib.PartialFC(C, D, **kw)
    lazy_opt = lazy.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-2, nesterov=nesterov)
    ref = pfclib.PartialFC(C, D, **kw)
    ref_opt = torch.optim.SGD([ref.weight], lr=0.5, momentum=0.9, weight_decay=5e-2, nesterov=nesterov)
    assert isinstance(lazy_opt, LazySGD)
    saved = None
    for t, ((emb, labels), lr) in enumerate(zip(_batches(steps, dtype=dtype), _schedule(steps))):
        for head, opt in ((lazy, lazy_opt), (ref, ref_opt)):
            opt.param_groups[0]["lr"] = lr
            head(emb, labels).backward()
            opt.step()
            opt.zero_grad()
        assert lazy.weight.grad is None
        if save_at == t + 1:
            saved = lazy.full_state_dict(lazy_opt)
    return lazy, lazy_opt, ref, ref_opt, saved


def test_default_head_equals_dense_torch_sgd_float64():
    lazy, lazy_opt, ref, ref_opt, _ = _head_pair(torch.float64, 200, nesterov=True)
    torch.testing.assert_close(lazy.centers(), ref.weight.detach(), **TOL64)
    lazy.sync()
    torch.testing.assert_close(lazy.weight.detach(), ref.weight.detach(), **TOL64)
    torch.testing.assert_close(
        lazy_opt.state[lazy.weight]["momentum_buffer"], ref_opt.state[ref.weight]["momentum_buffer"], **TOL64
    )


def test_default_head_equals_dense_torch_sgd_float32_few_steps():
    lazy, _, ref, _, _ = _head_pair(torch.float32, 5)
    lazy.eval()  # eval() applies the pending updates
    # the centers grow to ~100 (lr 0.5 on 0.01-sized initial rows): a few fp32 ulps of that scale
    scale = float(ref.weight.detach().abs().max())
    torch.testing.assert_close(lazy.weight.detach(), ref.weight.detach(), rtol=0, atol=1e-6 * scale)


def test_default_head_gradient_is_row_sparse_and_equals_dense_one():
    lazy = pfclib.PartialFC(C, D, sample_rate=0.2, dtype=torch.float64, seed=1)
    ref = pfclib.PartialFC(C, D, sample_rate=0.2, dtype=torch.float64, seed=1)
    lazy.make_optimizer("sgd")
    emb, labels = _batches(1)[0]
    lazy(emb, labels).backward()
    ref(emb, labels).backward()
    assert lazy.weight.grad.is_sparse and not ref.weight.grad.is_sparse
    torch.testing.assert_close(lazy.weight.grad.to_dense(), ref.weight.grad, **TOL64)


def test_adamw_keeps_the_dense_path():
    head = pfclib.PartialFC(C, D, sample_rate=0.2)
    opt = head.make_optimizer("adamw", lr=0.01)
    assert type(opt) is torch.optim.AdamW
    emb, labels = _batches(1, dtype=torch.float32)[0]
    head(emb, labels).backward()
    assert not head.weight.grad.is_sparse


def test_resume_from_a_mid_run_full_state_is_bitwise_the_uninterrupted_run():
    steps, cut = 60, 25
    lazy, _, ref, _, saved = _head_pair(torch.float64, steps, save_at=cut)
    kw = {
        "sample_rate": 0.2,
        "margin": {"name": "cosface", "s": 16.0, "m": 0.2},
        "dtype": torch.float64,
        "seed": 3,
    }
    resumed = pfclib.PartialFC(C, D, **kw)
    opt = resumed.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-2)
    resumed.load_full_state_dict(saved, opt)
    for (emb, labels), lr in list(zip(_batches(steps), _schedule(steps)))[cut:]:
        opt.param_groups[0]["lr"] = lr
        resumed(emb, labels).backward()
        opt.step()
        opt.zero_grad()
    resumed.sync()
    lazy.sync()
    assert torch.equal(resumed.weight, lazy.weight)
    torch.testing.assert_close(resumed.weight.detach(), ref.weight.detach(), **TOL64)
    # and the torch.optim.SGD state of that checkpoint continues in torch's own optimizer the same way
    assert saved["optimizer"]["class"] == "LazySGD" and set(saved["optimizer"]["state"]) == {
        "momentum_buffer"
    }


def _lazy_worker(rank, world_size, indexes, steps):
    head = pfclib.PartialFC(C, D, sample_rate=0.2, dtype=torch.float64, seed=3)
    opt = head.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-2)
    for t, ((emb, labels), lr) in enumerate(zip(_batches(steps), _schedule(steps))):
        opt.param_groups[0]["lr"] = lr
        gi = indexes[t]
        index = gi[(gi >= head.start) & (gi < head.start + head.n_local)] - head.start
        half = B // 2
        sl = slice(rank * half, (rank + 1) * half)
        head(emb[sl], labels[sl], index=index).backward()
        opt.step()
        opt.zero_grad()
    return head.full_state_dict(opt)


def _indexes(steps):
    g = torch.Generator().manual_seed(11)
    out = []
    for emb_labels in _batches(steps):
        labels = emb_labels[1]
        extra = torch.randperm(C, generator=g)[:8]
        out.append(torch.unique(torch.cat([labels, extra])))
    return out


@pytest.mark.distributed
def test_two_ranks_lazy_equal_one_rank_dense_torch_sgd_and_reshard():
    steps = 40
    indexes = _indexes(steps)
    full = run_gloo(_lazy_worker, 2, indexes, steps)[0]
    ref = pfclib.PartialFC(C, D, sample_rate=0.2, dtype=torch.float64, seed=3)
    ref_opt = torch.optim.SGD([ref.weight], lr=0.5, momentum=0.9, weight_decay=5e-2)
    for t, ((emb, labels), lr) in enumerate(zip(_batches(steps), _schedule(steps))):
        ref_opt.param_groups[0]["lr"] = lr
        ref(emb, labels, index=indexes[t]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    torch.testing.assert_close(full["weight"], ref.weight.detach(), **TOL64)
    torch.testing.assert_close(
        full["optimizer"]["state"]["momentum_buffer"], ref_opt.state[ref.weight]["momentum_buffer"], **TOL64
    )
    # the two-rank state onto one rank, continuing lazily, equals torch continuing densely
    one = pfclib.PartialFC(C, D, sample_rate=0.2, dtype=torch.float64, seed=3)
    opt = one.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-2)
    one.load_full_state_dict(full, opt)
    for emb, labels in _batches(10, seed=5):
        for head, o in ((one, opt), (ref, ref_opt)):
            head(emb, labels).backward()  # both generators are fresh from seed 3: same classes
            o.step()
            o.zero_grad()
    torch.testing.assert_close(one.centers(), ref.weight.detach(), **TOL64)
