"""CR-FIQA (pfclib.quality): the certainty ratio under Partial FC against a float64 reference (one
and two processes, sampled centers), the quality branch's loss and gradient, the config option,
exact resume with the branch, the scoring CLI and an error-versus-reject curve from its scores."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_resume import assert_checkpoints_bitwise_equal
from test_train import NO_BN, tiny_config, tiny_data  # noqa: F401 - the fixture is used by name

import pfclib
from pfclib import quality as pq
from pfclib.checkpoint import load_checkpoint, save_checkpoint
from pfclib.config import QualityConfig, TrainConfig
from pfclib.eval import embed, error_vs_reject, random_reject_baseline
from pfclib.multiproc import run_gloo
from pfclib.seeding import SEED_QUALITY, derive_seed
from pfclib.train import _epilog, training_function

C, D = 11, 8  # odd C: two ranks hold [0, 6) and [6, 11)


def _batch(n=8, seed=42):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 7, 9, 3, 10, 8, 6][:n])
    return emb, labels


def _reference(emb, labels, weight, sampled, eps=1e-9):
    """Plain float64 loops: CCS, NNCCS over the sampled classes other than the own one, CR."""
    x = emb.double().numpy()
    w = weight.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    out = []
    for i, y in enumerate(labels.tolist()):
        ccs = min(max(float(x[i] @ w[y]), -1.0), 1.0)
        nn = max(min(max(float(x[i] @ w[j]), -1.0), 1.0) for j in sampled if j != y)
        out.append((ccs / (nn + 1.0 + eps), ccs, nn))
    return torch.tensor(out, dtype=torch.float64)


def _head(rate=1.0, dtype=torch.float64, **kw):
    return pfclib.PartialFC(C, D, sample_rate=rate, margin="arcface", seed=1, dtype=dtype, **kw)


# ------------------------------------------------------------------------------ certainty ratio
@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_certainty_ratio_equals_a_float64_reference_full_and_sampled(update):
    emb, labels = _batch()
    head = _head(rate=0.5, update=update)
    opt = head.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=0.01)
    # a few steps so that (dense, lazy) unsampled rows have pending updates when the CR is read
    for s in range(3):
        head(emb[s:].clone(), labels[s:]).backward()
        opt.step()
        opt.zero_grad()
    index = torch.tensor([0, 2, 3, 6, 7, 8, 9, 10])  # every positive (0, 3, 6, 7, 8, 9, 10) and 2
    head(emb, labels, index=index)
    got = pq.certainty_ratio(head, emb)
    head.sync()  # the reference reads the current centers of every row
    ref = _reference(emb, labels, head.weight.detach(), index.tolist())
    torch.testing.assert_close(torch.stack(got, dim=1), ref, rtol=1e-12, atol=1e-14)
    # all classes (r = 1, index None): the paper's NNCCS, never below the sampled one
    full = _reference(emb, labels, head.weight.detach(), range(C))
    head(emb, labels, index=torch.arange(C))
    got_full = pq.certainty_ratio(head, emb)
    torch.testing.assert_close(torch.stack(got_full, dim=1), full, rtol=1e-12, atol=1e-14)
    assert bool((got.nnccs <= got_full.nnccs).all()) and bool((got.cr >= got_full.cr).all())
    assert bool((got.nnccs < got_full.nnccs).any())  # class 1, 4 or 5 was some row's nearest negative


def _reference_subcenters_dims(emb, labels, weight, K, dims, sampled, eps=1e-9):
    """Plain float64 loops with K sub-centers per class (a class's cosine: the max over its K) and
    only the kept dimensions ``dims`` on both sides."""
    x = emb.double().numpy()[:, dims]
    w = weight.double().numpy()[:, dims]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)

    def cos(i, c):
        return min(max(max(float(x[i] @ w[c * K + j]) for j in range(K)), -1.0), 1.0)

    out = []
    for i, y in enumerate(labels.tolist()):
        ccs = cos(i, y)
        nn = max(cos(i, j) for j in sampled if j != y)
        out.append((ccs / (nn + 1.0 + eps), ccs, nn))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("K, q", [(3, 1.0), (1, 0.5), (2, 0.5)])
def test_certainty_ratio_uses_the_loss_cosines_with_sub_centers_and_kept_dimensions(K, q):
    emb, labels = _batch()
    head = _head(rate=0.5, sub_centers=K, dim_sample_rate=q)
    opt = head.make_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=0.01)
    for s in range(2):  # pending lazy updates on unsampled rows
        head(emb[s:].clone(), labels[s:]).backward()
        opt.step()
        opt.zero_grad()
    index = torch.tensor([0, 2, 3, 6, 7, 8, 9, 10])
    head(emb, labels, index=index)
    dims = list(range(D)) if head.last_dims is None else head.last_dims.tolist()
    assert len(dims) == int(q * D)
    got = pq.certainty_ratio(head, emb)
    head.sync()
    ref = _reference_subcenters_dims(emb, labels, head.weight.detach(), K, dims, index.tolist())
    torch.testing.assert_close(torch.stack(got, dim=1), ref, rtol=1e-12, atol=1e-14)


def test_certainty_ratio_in_float32_is_close_and_reads_the_sample_of_the_last_forward():
    emb, labels = _batch()
    head = _head(rate=0.4, dtype=torch.float32)
    head(emb.float(), labels)  # the head's own sample
    index, target = head.last_sample
    assert index is not None and torch.equal(index, head.last_index) and target.shape == (8,)
    got = pq.certainty_ratio(head, emb.float())
    assert got.cr.dtype == torch.float32 and got.cr.shape == (8,)
    ref = _reference(emb, labels, head.weight.detach(), index.tolist())
    torch.testing.assert_close(torch.stack(got, dim=1).double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="saw 8 rows over all ranks, these embeddings make 3"):
        pq.certainty_ratio(head, emb[:3].float())
    with pytest.raises(RuntimeError, match="call head"):
        pq.certainty_ratio(_head(), emb)


def test_certainty_ratio_edge_values():
    # NNCCS = -1 (the opposite center): the denominator is eps, the ratio finite
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    out = pq.certainty_ratio_gathered(x, w, torch.tensor([0]))
    assert out.ccs.item() == 1.0 and out.nnccs.item() == -1.0 and out.cr.item() == 1.0 / (-1.0 + (1 + 1e-9))
    assert math.isfinite(out.cr.item())
    # chunking over the centers changes nothing
    g = torch.Generator().manual_seed(0)
    xs = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    ws = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    t = torch.tensor([0, 8, 3, 4, 4, 7])
    whole, chunked = (
        pq.certainty_ratio_gathered(xs, ws, t),
        pq.certainty_ratio_gathered(xs, ws, t, chunk_size=2),
    )
    for a, b in zip(whole, chunked):  # the same dot products, blocked differently
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="owned by no rank"):
        pq.certainty_ratio_gathered(xs, ws, torch.tensor([0, -1, 3, 4, 4, 7]))
    with pytest.raises(ValueError, match="at least two classes"):
        pq.certainty_ratio_gathered(xs[:1], ws[:1], torch.tensor([0]))


SAMPLED = [0, 2, 3, 6, 7, 8, 9, 10]
SIZES = [3, 5]


def _cr_worker(rank, world_size, sampled):
    emb, labels = _batch()
    lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    out = []
    for use_index in (True, False):
        head = _head(rate=1.0 if not use_index else 0.5)
        index = None
        if use_index:
            gi = torch.tensor(sampled)
            index = gi[(gi >= head.start) & (gi < head.start + head.n_local)] - head.start
        head(emb[lo:hi], labels[lo:hi], index=index)
        out.append(pq.certainty_ratio(head, emb[lo:hi]))
    return out


@pytest.mark.distributed
def test_two_processes_give_the_certainty_ratio_of_one():
    """Unequal batches (3 + 5 rows), classes [0, 6) and [6, 11): the nearest negative found by the
    cross-rank maximum equals one process's and the float64 reference, sampled or not."""
    per_rank = run_gloo(_cr_worker, 2, SAMPLED)
    emb, labels = _batch()
    for i, sampled in enumerate((SAMPLED, list(range(C)))):
        head = _head(rate=0.5)
        head(emb, labels, index=torch.tensor(sampled))
        one = pq.certainty_ratio(head, emb)
        two = [torch.cat([per_rank[0][i][k], per_rank[1][i][k]]) for k in range(3)]
        assert per_rank[0][i].cr.shape == (3,) and per_rank[1][i].cr.shape == (5,)
        for a, b in zip(two, one):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        ref = _reference(emb, labels, head.weight.detach(), sampled)
        torch.testing.assert_close(torch.stack(two, dim=1), ref, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ branch and loss
def test_quality_loss_gradient_reaches_the_branch_and_the_embeddings_not_the_target():
    emb, labels = _batch()
    head = _head(rate=1.0)
    branch = pq.QualityBranch(D, seed=3).double()
    x = emb.clone().requires_grad_()
    head(x, labels)
    cr = pq.certainty_ratio(head, x).cr
    assert not cr.requires_grad
    pred = branch(x)
    weight, beta = 10.0, 0.5
    loss = weight * pq.quality_loss(pred, cr, beta=beta)
    loss.backward()
    d = (pred - cr).detach()
    dpred = torch.where(d.abs() < beta, d / beta, d.sign()) / d.numel() * weight  # SmoothL1's derivative
    torch.testing.assert_close(branch.linear.bias.grad, dpred.sum().reshape(1))
    torch.testing.assert_close(branch.linear.weight.grad, (dpred[:, None] * x.detach()).sum(0, keepdim=True))
    # the embedding's gradient is the branch's only: the certainty ratio is a constant target
    torch.testing.assert_close(x.grad, dpred[:, None] * branch.linear.weight.detach())
    expected = torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta).mean() * weight
    torch.testing.assert_close(loss.detach(), expected)
    # seeded: the same weights every time, and torch's global generator untouched
    state = torch.get_rng_state()
    assert torch.equal(pq.QualityBranch(D, seed=3).linear.weight, pq.QualityBranch(D, seed=3).linear.weight)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------ config
def test_quality_config_defaults_and_validation():
    q = TrainConfig.from_dict({"max_steps": 1}).quality
    assert (q.enabled, q.weight, q.beta, q.eps) == (False, 10.0, 0.5, 1e-9)  # off; the paper's lambda, eps
    assert TrainConfig.from_dict({"max_steps": 1, "quality": {"enabled": True}}).quality.enabled
    bad = {
        "weight": (0, r"quality.weight must be a finite number > 0 \(lambda of the quality loss\), got 0"),
        "beta": (-0.5, r"quality.beta must be a finite number >= 0, got -0.5"),
        "eps": (1.0, r"quality.eps must be in \[0, 1\)"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict({"max_steps": 1, "quality": {key: value}})
    for value in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="quality.weight must be a finite number > 0"):
            QualityConfig(weight=value)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['quality.lambda'\] in quality"):
        TrainConfig.from_dict({"max_steps": 1, "quality": {"lambda": 10.0}})
    with pytest.raises(TypeError, match="quality.enabled must be bool"):
        TrainConfig.from_dict({"max_steps": 1, "quality": {"enabled": "yes"}})
    with pytest.raises(TypeError, match="YAML reads 1e-9 as text"):
        TrainConfig.from_dict({"max_steps": 1, "quality": {"eps": "1e-9"}})
    assert "quality:     enabled weight (lambda) beta eps" in _epilog()


# --------------------------------------------------------------------------- training and resume
QUALITY_RUN = {"quality.enabled": True, "eval.verification": [], "data.batch_size": 16}


def test_a_run_without_the_branch_has_none_and_cannot_be_resumed_with_it(tiny_data, tmp_path, capsys):  # noqa: F811
    cfg = tiny_config(tiny_data, tmp_path / "off", max_steps=2, **{"eval.verification": []})
    m = training_function(cfg)
    state = load_checkpoint(m["checkpoint"])
    assert "quality" not in state and len(state["backbone_optimizer"]["param_groups"]) == 1
    assert "quality_loss_history" not in m
    with pytest.raises(ValueError, match="trained without the quality branch"):
        pq.load_quality_model(tmp_path / "off")
    assert pq.main(["score", str(tmp_path / "off"), "--data", str(tiny_data / "pairs"), "--kind", "pairs",
                    "--out", str(tmp_path / "q.csv")]) == 2  # fmt: skip
    assert not (tmp_path / "q.csv").exists()
    err = capsys.readouterr().err
    assert "was trained without the quality branch" in err and "quality.enabled=true" in err
    on = {**cfg, "max_steps": 4, "resume": "auto", "quality": {"enabled": True}}
    with pytest.raises(ValueError, match=r"settings changed: quality.enabled: False -> True"):
        training_function(on)
    # a checkpoint of an older version (no quality section in its config) is refused by name too
    state["config"].pop("quality")
    save_checkpoint(state, m["checkpoint"])
    with pytest.raises(ValueError, match="with quality.enabled=true: that checkpoint was trained without"):
        training_function(on)
    training_function({**cfg, "max_steps": 3, "resume": "auto"})  # and resumes without the branch


def test_stopped_and_resumed_run_with_the_branch_is_bitwise_identical(tiny_data, tmp_path):  # noqa: F811
    extra = {**QUALITY_RUN, "max_steps": 4, "checkpoint.every": 2, "log.every": 1}
    full = training_function(tiny_config(tiny_data, tmp_path / "full", **extra))
    cut_cfg = tiny_config(tiny_data, tmp_path / "cut", **extra)
    cut = training_function({**cut_cfg, "stop_after": 2})
    resumed = training_function({**cut_cfg, "resume": "auto"})
    assert cut["steps"] == 2 and resumed["start_step"] == 2 and resumed["steps"] == 4
    assert resumed["loss_history"] == full["loss_history"][2:]
    assert resumed["quality_loss_history"] == full["quality_loss_history"][2:]
    assert cut["quality_loss_history"] == full["quality_loss_history"][:2]
    assert all(math.isfinite(v) and v > 0 for v in full["quality_loss_history"])
    # the quality loss is logged beside the margin loss, and the resumed log equals the full one
    for run in ("full", "cut"):
        with (tmp_path / run / "log.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert [float(r["quality_loss"]) for r in rows] == pytest.approx(
            full["quality_loss_history"], rel=1e-5
        )
    assert_checkpoints_bitwise_equal(Path(full["checkpoint"]), Path(resumed["checkpoint"]))
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert a["quality"].keys() == {"linear.weight", "linear.bias"}
    assert all(torch.equal(a["quality"][k], b["quality"][k]) for k in a["quality"])
    assert len(a["backbone_optimizer"]["param_groups"]) == 2  # the branch's momentum is saved too
    initial = pq.QualityBranch(32, seed=derive_seed(0, SEED_QUALITY))
    assert not torch.equal(a["quality"]["linear.weight"], initial.linear.weight)  # it trained
    # switching the branch off on resume is refused like any change of what the checkpoint means
    with pytest.raises(ValueError, match=r"quality.enabled: True -> False"):
        training_function({**cut_cfg, "max_steps": 6, "resume": "auto", "quality": {"enabled": False}})


# BatchNorm-free backbone, no flips, r = 1: a batch split over micro-batches or processes gives the
# whole batch's losses and gradients, the quality branch's included
SPLIT = {**QUALITY_RUN, "backbone": NO_BN, "max_steps": 3, "data.hflip": False, "head.sample_rate": 1.0,
         "optim.grad_clip": 1.0}  # fmt: skip


def _train_and_keep(cfg):
    keep = {}
    m = training_function(cfg, callback=lambda e, i: keep.update(i) if e == "end" else None)
    return m, {k: v.detach().clone() for k, v in keep["quality"].state_dict().items()}


def _train_on_rank(rank, world_size, cfg):
    return _train_and_keep(cfg)


def _assert_same_run(a, b):
    (m1, q1), (m2, q2) = a, b
    assert m2["loss_history"] == pytest.approx(m1["loss_history"], rel=1e-5)
    assert m2["quality_loss_history"] == pytest.approx(m1["quality_loss_history"], rel=1e-5)
    for k in q1:
        torch.testing.assert_close(q2[k], q1[k], rtol=1e-4, atol=1e-6)
    assert not torch.equal(
        q1["linear.weight"], pq.QualityBranch(32, seed=derive_seed(0, SEED_QUALITY)).linear.weight
    )


def test_gradient_accumulation_with_the_branch_equals_the_big_batch(tiny_data, tmp_path):  # noqa: F811
    one = _train_and_keep(tiny_config(tiny_data, tmp_path / "b32", **{**SPLIT, "data.batch_size": 32}))
    two = _train_and_keep(
        tiny_config(
            tiny_data,
            tmp_path / "b16",
            **{**SPLIT, "data.batch_size": 16, "optim.gradient_accumulation_steps": 2},
        )
    )
    _assert_same_run(one, two)


@pytest.mark.distributed
def test_two_processes_with_the_branch_equal_one(tiny_data, tmp_path):  # noqa: F811
    one = _train_and_keep(tiny_config(tiny_data, tmp_path / "one", **{**SPLIT, "data.batch_size": 32}))
    r0, r1 = run_gloo(
        _train_on_rank, 2, tiny_config(tiny_data, tmp_path / "two", **{**SPLIT, "data.batch_size": 16})
    )
    assert r0[0]["quality_loss_history"] == r1[0]["quality_loss_history"]  # the mean over ranks, on both
    for k in r0[1]:
        assert torch.equal(r0[1][k], r1[1][k])  # one branch: its gradient is averaged over the ranks
    _assert_same_run(one, r0)


# ------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def quality_run(tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("quality") / "run"
    training_function(tiny_config(tiny_data, out, **{**QUALITY_RUN, "max_steps": 30, "data.batch_size": 32}))
    return out


def test_score_cli_writes_one_quality_per_image(tiny_data, quality_run, tmp_path, capsys):  # noqa: F811
    model, branch, config, ckpt = pq.load_quality_model(quality_run)
    assert not model.training and not branch.training and ckpt.name == "ckpt_00000030.pt"
    from pfclib.data import load_verification

    vset = load_verification(tiny_data / "pairs", image_size=32)
    expected = pq.score_images(model, branch, vset.images)
    out = tmp_path / "pairs.csv"
    assert pq.main(["score", str(quality_run), "--data", str(tiny_data / "pairs"), "--kind", "pairs",
                    "--out", str(out)]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == vset.images.shape[0] == 2 * len(vset.issame)
    assert [r["name"] for r in rows[:2]] == ["pair0.a", "pair0.b"]
    np.testing.assert_array_equal([float(r["quality"]) for r in rows], expected)  # repr: exact
    assert "wrote 400 quality scores" in capsys.readouterr().out
    # image files, JSON
    paths = []
    for i in range(3):
        p = tmp_path / f"face{i}.png"
        Image.fromarray(vset.images[i].numpy().transpose(1, 2, 0)).save(p)
        paths.append(str(p))
    out_json = tmp_path / "files.json"
    assert pq.main(["score", str(ckpt), *paths, "--out", str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["count"] == 3 and doc["step"] == 30 and [r["name"] for r in doc["rows"]] == paths
    np.testing.assert_allclose([r["quality"] for r in doc["rows"]], expected[:3], rtol=1e-6, atol=1e-6)
    # a training data set: labels too
    out_ds = tmp_path / "train.csv"
    assert (
        pq.main(
            ["score", str(quality_run), "--data", str(tiny_data), "--kind", "synthetic", "--out", str(out_ds)]
        )
        == 0
    )
    rows = list(csv.DictReader(out_ds.open()))
    assert len(rows) == 24 * 16 and {r["label"] for r in rows} == {str(i) for i in range(24)}
    for argv, message in (
        (["score", str(quality_run), "--out", str(tmp_path / "x.csv")], "either image files or --data"),
        (["score", str(quality_run), *paths, "--out", str(tmp_path / "x.txt")], "must name a .csv or .json"),
    ):
        with pytest.raises(SystemExit):
            pq.main(argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.txt").exists()


def test_error_versus_reject_from_the_branch_scores(tiny_data, quality_run):  # noqa: F811
    from pfclib.data import load_verification

    model, branch, _, _ = pq.load_quality_model(quality_run)
    vset = load_verification(tiny_data / "pairs", image_size=32)
    quality = pq.score_images(model, branch, vset.images)
    assert quality.shape == (vset.images.shape[0],) and np.isfinite(quality).all()
    emb = embed(model, vset.images)
    scores = np.sum(emb[0::2] * emb[1::2], axis=1)
    issame = np.asarray(vset.issame, dtype=bool)
    fractions = np.arange(10) / 20  # 0 ... 0.45
    fmr = 0.1
    erc = error_vs_reject(scores, issame, quality[0::2], quality[1::2], fmr=fmr, reject_fractions=fractions)
    n = len(fractions)
    assert all(
        np.shape(erc[k]) == (n,) for k in ("reject_fraction", "fnmr", "num_rejected", "num_genuine_kept")
    )
    assert np.all(np.diff(erc["reject_fraction"]) > 0) and np.all(np.diff(erc["num_rejected"]) > 0)
    np.testing.assert_array_equal(erc["num_rejected"], np.floor(fractions * len(scores) + 1e-9).astype(int))
    assert erc["num_genuine_kept"][0] == issame.sum() and np.all(np.diff(erc["num_genuine_kept"]) <= 0)
    # at 0 rejection: the plain FNMR at that FMR, the threshold found by brute force over the scores
    impostor, genuine = scores[~issame], scores[issame]
    candidates = np.sort(np.append(scores, np.inf))
    t = next(c for c in candidates if np.mean(impostor >= c) <= fmr)
    assert erc["threshold"] == t and erc["fmr_at_threshold"] <= fmr
    assert erc["fnmr"][0] == np.mean(genuine < t)
    base = random_reject_baseline(scores, issame, fmr=fmr, reject_fractions=fractions, n_repeats=0)
    assert np.all(base["fnmr"] == erc["fnmr"][0])


def test_the_log_names_each_extra_loss_in_the_csv_the_console_and_tensorboard(tmp_path):
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pfclib.config import TrainConfig
    from pfclib.logs import TrainLog

    cfg = TrainConfig.from_dict({"max_steps": 2, "log": {"every": 1, "tensorboard": True, "progress": "off"}})
    console = io.StringIO()
    log = TrainLog(cfg, tmp_path, active=True, vnames=[], start_step=0, end_step=2, total_steps=2,
                   resumed=False, images_per_step=8, extra_losses=["quality_loss"], stream=console)  # fmt: skip
    step = {"lr": 0.1, "head_lr": 0.1, "grad_norm": 1.0, "epoch": 0.5, "seconds": 0.01}
    log.step(1, loss=3.0, extra={"quality_loss": 0.25}, **step)
    with pytest.raises(ValueError, match=r"extra losses \[\] given, \['quality_loss'\] expected"):
        log.step(2, loss=2.0, **step)
    log.step(2, loss=2.0, extra={"quality_loss": 0.125}, **step)
    log.close()
    with (tmp_path / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["quality_loss"]) for r in rows] == [0.25, 0.125]
    assert "loss 3.0000  quality_loss 0.2500  lr" in console.getvalue()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/quality_loss")] == [0.25, 0.125]
