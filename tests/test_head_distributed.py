"""Two gloo processes must equal one process on the concatenated batch (the shard rule in `pfclib.distributed.shard_range`)."""

import pytest
import torch

import pfclib
from pfclib.multiproc import run_gloo

C, D = 11, 8  # odd C: the shards are [0, 6) and [6, 11)


def _scenario(name, sizes, rate, update, chunk, margin, index, optimizer="head", **head):
    """One case: the batch split ``sizes`` over the two ranks, the head's rate, update, chunk and
    margin, the sampled global classes ``index`` (None: the head samples), which optimizer steps
    (``"torch"``: torch's SGD on a dense gradient) and extra ``PartialFC`` arguments."""
    return dict(name=name, sizes=sizes, rate=rate, update=update, chunk=chunk, margin=margin,
                index=index, optimizer=optimizer, head=head)  # fmt: skip


I8 = [0, 2, 3, 6, 7, 8, 9, 10]  # sampled classes with both shards represented
I9 = [0, 1, 3, 4, 6, 7, 8, 9, 10]
I9B = [0, 2, 3, 5, 6, 7, 8, 9, 10]
ADA = {"name": "adaface", "alpha": 0.5, "h": 1.0}
# fmt: off
SCENARIOS = [
    _scenario("r1-dense", [4, 4], 1.0, "dense", None, "arcface", None),
    _scenario("r05-dense-unequal", [3, 5], 0.5, "dense", None, "cosface", I8),
    _scenario("r05-sparse-chunked", [4, 4], 0.5, "sparse", 2, {"name": "arcface_st", "filter_threshold": 0.3}, I9),
    # per-row margins: AdaFace's statistics of the global batch, NPCFace's hard negatives of all ranks
    _scenario("adaface-r05-lazy-unequal", [3, 5], 0.5, "dense", None, ADA, I8),
    _scenario("adaface-r1-sparse-chunked", [4, 4], 1.0, "sparse", 3, "adaface", None),
    _scenario("npcface-r05-torch-sgd", [3, 5], 0.5, "dense", None, "npcface", [0, 1, 3, 6, 7, 8, 9, 10], "torch"),
    _scenario("npcface-r05-lazy", [4, 4], 0.5, "dense", None, {"name": "npcface", "filter_threshold": 0.6}, I9B),
    _scenario("npcface-r05-sparse-chunked", [4, 4], 0.5, "sparse", 2, "npcface", I9),
    # Sub-center ArcFace (a rank owns whole classes with their K rows) and Unicom's kept dimensions
    # (the head draws them itself: every rank must draw the same ones)
    _scenario("subcenter3-r05-lazy-unequal", [3, 5], 0.5, "dense", None, "arcface", I8, sub_centers=3),
    _scenario("subcenter2-unicom05-npcface-sparse-chunked", [4, 4], 0.5, "sparse", 2, "npcface", I9,
              sub_centers=2, dim_sample_rate=0.5),
    _scenario("unicom05-adaface-torch-sgd", [3, 5], 1.0, "dense", None, ADA, None, "torch", dim_sample_rate=0.5),
    _scenario("subcenter3-unicom05-lazy", [4, 4], 0.5, "dense", None, "cosface", I9B, sub_centers=3,
              dim_sample_rate=0.5),
]
# fmt: on


def _batch(sizes):
    g = torch.Generator().manual_seed(42)
    n = sum(sizes)
    emb = torch.randn(n, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 7, 9, 3, 10, 8, 6][:n])
    return emb, labels


def _make_head(sc):
    return pfclib.PartialFC(
        C,
        D,
        sample_rate=sc["rate"],
        update=sc["update"],
        chunk_size=sc["chunk"],
        margin=sc["margin"],
        dtype=torch.float64,
        seed=1,
        **sc["head"],
    )


def _step(head, emb, labels, index, optimizer="head"):
    if optimizer == "torch":  # torch's SGD on a dense gradient: the head's (N, k) logits path
        opt = torch.optim.SGD([head.weight], lr=0.5, momentum=0.9, weight_decay=0.01)
    else:
        opt = head.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=0.01)
    emb = emb.clone().requires_grad_()
    loss = head(emb, labels, index=index)
    loss.backward()
    grad = head.weight.grad
    grad = grad.to_dense() if grad.is_sparse else grad.clone()
    opt.step()
    return loss.detach(), emb.grad, grad, opt


def _margin_state(head):
    """The head's margin buffers (AdaFace's moving averages; empty for other margins)."""
    return {k: v.detach().clone() for k, v in head.named_buffers() if k.startswith("margin_")}


def _worker(rank, world_size, scenarios):
    out = []
    for sc in scenarios:
        emb, labels = _batch(sc["sizes"])
        lo = sum(sc["sizes"][:rank])
        hi = lo + sc["sizes"][rank]
        head = _make_head(sc)
        assert head.world_size == world_size == 2 and head.rank == rank
        index = None
        if sc["index"] is not None:
            gi = torch.tensor(sc["index"])
            index = gi[(gi >= head.start) & (gi < head.start + head.n_local)] - head.start
        loss, emb_grad, w_grad, opt = _step(head, emb[lo:hi], labels[lo:hi], index, sc["optimizer"])
        full = head.full_state_dict(opt)
        out.append(
            {
                "loss": loss,
                "emb_grad": emb_grad,
                "w_grad": w_grad,
                "full": full,
                "margin_state": _margin_state(head),
                "dims": head.last_dims,
            }
        )
    # the head's own sampling: valid on every rank, loss equal on both
    head = pfclib.PartialFC(C, D, sample_rate=0.4, seed=3)
    emb, labels = _batch([4, 4])
    loss = head(emb[4 * rank : 4 * rank + 4], labels[4 * rank : 4 * rank + 4])
    out.append(
        {"loss": loss.detach(), "index": head.last_index, "start": head.start, "n_local": head.n_local}
    )
    return out


@pytest.mark.distributed
def test_two_processes_equal_one_process():
    per_rank = run_gloo(_worker, 2, SCENARIOS)
    for i, sc in enumerate(SCENARIOS):
        emb, labels = _batch(sc["sizes"])
        single = _make_head(sc)
        index = None if sc["index"] is None else torch.tensor(sc["index"])
        loss, emb_grad, w_grad, opt = _step(single, emb, labels, index, sc["optimizer"])
        single.sync()  # dense SGD is lazy: apply the pending updates before reading weight and state
        r0, r1 = per_rank[0][i], per_rank[1][i]
        tol = {"rtol": 1e-10, "atol": 1e-12}
        # Unicom: both ranks kept the dimensions one process keeps
        if sc["head"].get("dim_sample_rate", 1.0) < 1.0:
            assert single.last_dims.numel() == D // 2
            assert torch.equal(r0["dims"], single.last_dims) and torch.equal(r1["dims"], single.last_dims)
        else:
            assert r0["dims"] is None and single.last_dims is None
        torch.testing.assert_close(r0["loss"], loss, **tol)
        torch.testing.assert_close(r1["loss"], loss, **tol)
        # W * d(global mean loss)/d(emb_r): DDP's average over W then gives the true gradient
        torch.testing.assert_close(torch.cat([r0["emb_grad"], r1["emb_grad"]]) / 2, emb_grad, **tol)
        torch.testing.assert_close(torch.cat([r0["w_grad"], r1["w_grad"]]), w_grad, **tol)
        torch.testing.assert_close(r0["full"]["weight"], single.weight.detach(), **tol)
        torch.testing.assert_close(r1["full"]["weight"], single.weight.detach(), **tol)
        # AdaFace's running statistics: every rank agrees with one process (the global batch's)
        single_state = _margin_state(single)
        assert set(single_state) == set(r0["margin_state"]) == set(r1["margin_state"])
        assert ("adaface" in str(sc["margin"])) == bool(single_state)
        for key, value in single_state.items():
            assert torch.equal(r0["margin_state"][key], r1["margin_state"][key])
            torch.testing.assert_close(r0["margin_state"][key], value, rtol=1e-14, atol=0)
        torch.testing.assert_close(
            r0["full"]["optimizer"]["state"]["momentum_buffer"],
            opt.state[single.weight]["momentum_buffer"],
            **tol,
        )
        # the full state saved by two ranks loads onto one
        reloaded = _make_head(sc)
        reloaded.load_full_state_dict(r0["full"])
        torch.testing.assert_close(reloaded.weight, single.weight, **tol)
    own0, own1 = per_rank[0][-1], per_rank[1][-1]
    assert torch.equal(own0["loss"], own1["loss"]) and torch.isfinite(own0["loss"])
    _, labels = _batch([4, 4])
    for own in (own0, own1):
        mine = labels[(labels >= own["start"]) & (labels < own["start"] + own["n_local"])] - own["start"]
        assert set(mine.tolist()) <= set(own["index"].tolist())
        assert own["index"].numel() == max(int(0.4 * own["n_local"]), mine.unique().numel())


def _error_worker(rank, world_size, full):
    head = pfclib.PartialFC(C, D, update="sparse")
    opt = head.make_optimizer("adamw", lr=0.1)
    head.load_full_state_dict(full, opt)
    result = {
        "weight": head.weight.detach().clone(),
        "exp_avg": opt.state[head.weight]["exp_avg"].clone(),
        "step": opt.state[head.weight]["step"].clone(),
        "start": head.start,
    }
    labels = torch.tensor([0, 1]) if rank == 0 else torch.tensor([0, C + 5])
    try:
        head(torch.randn(2, D), labels)
        result["error"] = None
    except (ValueError, TypeError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


@pytest.mark.distributed
def test_bad_input_on_one_rank_raises_on_every_rank_and_one_rank_state_loads_on_two():
    single = pfclib.PartialFC(C, D, update="dense")
    opt = single.make_optimizer("adamw", lr=0.1)
    emb = torch.randn(5, D)
    single(emb, torch.tensor([0, 4, 6, 9, 10])).backward()
    opt.step()
    full = single.full_state_dict(opt)
    r0, r1 = run_gloo(_error_worker, 2, full)
    assert "rank(s) [1] rejected their inputs" in r0["error"]
    assert r1["error"].startswith("ValueError: rank 1: labels must lie in [0, 11)") and "[16]" in r1["error"]
    for r in (r0, r1):
        rows = slice(r["start"], r["start"] + r["weight"].shape[0])
        assert torch.equal(r["weight"], single.weight.detach()[rows])
        assert torch.equal(r["exp_avg"], opt.state[single.weight]["exp_avg"][rows])
        assert r["step"].tolist() == [1] * r["weight"].shape[0]
    assert r0["weight"].shape[0] == 6 and r1["weight"].shape[0] == 5
