"""Backbone registry: every registered model runs forward and backward; layouts match the papers."""

import time

import pytest
import torch
from torch import nn

from pfclib import models
from pfclib.models.iresnet import LAYOUTS, IBasicBlock, final_map_size
from pfclib.models.mobilefacenet import Bottleneck
from pfclib.models.vit import VisionTransformer

TINY = ["iresnet_tiny", "mobilefacenet_tiny", "vit_tiny"]
REQUIRED = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet", "vit_s", *TINY]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_lists_the_required_models_sorted():
    names = models.list_models()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("name", models.list_models())
def test_every_registered_model_runs_forward_and_backward(name):
    batch = 4 if name in TINY else 2  # the full-size ones at 32x32, batch 2, keep the file fast on a CPU
    emb = 24
    model = models.create(name, embedding_size=emb, image_size=32, seed=0)
    assert model.training
    assert (model.embedding_size, model.image_size) == (emb, 32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    x_before = x.clone()
    out = model(x)
    assert out.shape == (batch, emb)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    target = torch.randn(batch, emb, generator=gen)
    (out * target).sum().backward()
    assert torch.equal(x, x_before)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients in {bad}"
    zero = [n for n, p in trainable if not p.grad.abs().sum() > 0]
    assert not zero, f"{name}: parameters whose gradient is exactly zero: {zero}"


@pytest.mark.parametrize("name", TINY)
def test_eval_mode_has_no_cross_sample_dependence(name):
    model = models.create(name, embedding_size=16, image_size=32, seed=3)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    model(x)  # move the BN running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        whole = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_seed_gives_identical_weights_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = models.create(name, embedding_size=16, image_size=32, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = models.create(name, embedding_size=16, image_size=32, seed=7)
    c = models.create(name, embedding_size=16, image_size=32, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_name_raises_listing_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as info:
        models.create("resnet9000")
    for name in REQUIRED:
        assert name in str(info.value)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "512", None])
def test_bad_embedding_size_raises(bad):
    with pytest.raises(ValueError, match=rf"embedding_size must be a positive int, got {bad!r}"):
        models.create("iresnet_tiny", embedding_size=bad, image_size=32)


@pytest.mark.parametrize("bad", [0, -1, 1.5, False])
def test_bad_image_size_type_raises(bad):
    with pytest.raises(ValueError, match=rf"image_size must be a positive int, got {bad!r}"):
        models.create("vit_tiny", embedding_size=8, image_size=bad)


@pytest.mark.parametrize(
    ("name", "image_size", "message"),
    [
        ("iresnet_tiny", 8, "IResNet needs image_size >= 16.*got 8"),
        ("mobilefacenet", 8, "4 stride-2 layers needs image_size >= 16, got 8"),
        ("vit_tiny", 30, "image_size=30 must be a multiple of patch_size=4"),
        ("vit_s", 36, "image_size=36 must be a multiple of patch_size=8"),
    ],
)
def test_image_size_the_model_cannot_use_raises(name, image_size, message):
    with pytest.raises(ValueError, match=message):
        models.create(name, embedding_size=8, image_size=image_size)


def test_register_adds_a_name_and_rejects_duplicates():
    @models.register("test_linear_backbone")
    def _factory(embedding_size, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, embedding_size))

    try:
        assert "test_linear_backbone" in models.list_models()
        net = models.create("test_linear_backbone", embedding_size=5, image_size=4)
        assert net(torch.zeros(2, 3, 4, 4)).shape == (2, 5)
        with pytest.raises(ValueError, match="'test_linear_backbone' is already registered"):
            models.register("test_linear_backbone")(_factory)
    finally:
        models.unregister("test_linear_backbone")
    assert "test_linear_backbone" not in models.list_models()
    with pytest.raises(ValueError, match="unknown model 'test_linear_backbone'"):
        models.unregister("test_linear_backbone")


# ---------------------------------------------------------------------------------------------- iresnet


def _iresnet_param_count(layers, emb, image_size, widths=(64, 128, 256, 512)):
    """Independent count from the paper layout (BN: 2 per channel, PReLU: 1 per channel, no conv bias)."""
    n = 3 * widths[0] * 9 + 2 * widths[0] + widths[0]
    cin = widths[0]
    for blocks, cout in zip(layers, widths):
        for i in range(blocks):
            c_in = cin if i == 0 else cout
            n += 2 * c_in + c_in * cout * 9 + 2 * cout + cout + cout * cout * 9 + 2 * cout
            if i == 0:
                n += c_in * cout + 2 * cout
        cin = cout
    m = image_size
    for _ in range(4):
        m = -(-m // 2)
    return n + 2 * widths[-1] + widths[-1] * m * m * emb + emb + 2 * emb


@pytest.mark.parametrize(
    ("name", "published_millions"),
    [("iresnet18", 24.0), ("iresnet34", 34.1), ("iresnet50", 43.6), ("iresnet100", 65.2)],
)
def test_iresnet_layout_matches_the_paper(name, published_millions):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = models.create(name, embedding_size=512, image_size=112)
    blocks = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert tuple(blocks) == LAYOUTS[name]
    assert all(isinstance(b, IBasicBlock) for i in range(1, 5) for b in getattr(model, f"layer{i}"))
    assert model.fc.in_features == 512 * 7 * 7
    count = sum(p.numel() for p in model.parameters())
    assert count == _iresnet_param_count(LAYOUTS[name], 512, 112)
    assert round(count / 1e6, 1) == published_millions  # the sizes quoted for the insightface models


@pytest.mark.parametrize(("image_size", "side"), [(112, 7), (32, 2), (96, 6), (100, 7), (16, 1)])
def test_iresnet_fc_input_is_computed_from_the_image_size(image_size, side):
    assert final_map_size(image_size) == side
    model = models.create("iresnet_tiny", embedding_size=8, image_size=image_size)
    assert model.fc.in_features == 64 * side * side
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, image_size, image_size)).shape == (1, 8)


def test_iresnet_block_structure_and_feature_scale():
    block = IBasicBlock(8, 16, stride=2)
    kinds = [
        type(m).__name__ for m in (block.bn1, block.conv1, block.bn2, block.prelu, block.conv2, block.bn3)
    ]
    assert kinds == ["BatchNorm2d", "Conv2d", "BatchNorm2d", "PReLU", "Conv2d", "BatchNorm2d"]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample is not None and IBasicBlock(8, 8).downsample is None
    # reference behaviour: the output BN scale is fixed at 1, only its shift learns
    model = models.create("iresnet_tiny", embedding_size=8, image_size=32)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(8))
    free = models.create("iresnet_tiny", embedding_size=8, image_size=32, fix_feature_scale=False)
    assert free.features.weight.requires_grad


def test_iresnet_zero_init_residual_makes_blocks_identities():
    model = models.create("iresnet_tiny", embedding_size=8, image_size=32, zero_init_residual=True, seed=0)
    block = model.layer2[0]
    assert torch.equal(block.bn3.weight, torch.zeros_like(block.bn3.weight))
    block = IBasicBlock(4, 4)
    nn.init.zeros_(block.bn3.weight)
    block.eval()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_iresnet_dropout_is_applied_before_the_fc():
    model = models.create("iresnet_tiny", embedding_size=8, image_size=32, dropout=0.5, seed=0)
    assert model.dropout.p == 0.5
    with pytest.raises(ValueError, match="dropout must be in"):
        models.create("iresnet_tiny", embedding_size=8, image_size=32, dropout=1.0)


# ---------------------------------------------------------------------------------------------- MobileFaceNet


def test_mobilefacenet_matches_the_paper_layout():
    model = models.create("mobilefacenet", embedding_size=128, image_size=112, seed=0)
    bottlenecks = [m for m in model.features if isinstance(m, Bottleneck)]
    assert len(bottlenecks) == 5 + 1 + 6 + 1 + 2
    widths = [b.block[-1][0].out_channels for b in bottlenecks]
    assert widths == [64] * 5 + [128] * 10
    gdc = model.gdc[0]
    assert gdc.kernel_size == (7, 7) and gdc.groups == 512 and gdc.padding == (0, 0)
    # the paper's MobileFaceNet (D=128) has about 0.99M parameters; ours adds the BN/PReLU parameters
    count = sum(p.numel() for p in model.parameters())
    assert 0.95e6 < count < 1.1e6
    small = models.create("mobilefacenet", embedding_size=16, image_size=32)
    assert small.gdc[0].kernel_size == (2, 2)


def test_mobilefacenet_bottleneck_residual_only_when_shapes_match():
    assert Bottleneck(16, 16, stride=1, expansion=2).use_residual
    assert not Bottleneck(16, 16, stride=2, expansion=2).use_residual
    assert not Bottleneck(16, 32, stride=1, expansion=2).use_residual
    depthwise = Bottleneck(16, 32, stride=2, expansion=4).block[1][0]
    assert depthwise.groups == 64 and depthwise.stride == (2, 2)


# ---------------------------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_pooling_and_token_count(pool):
    model = models.create("vit_tiny", embedding_size=12, image_size=32, pool=pool, seed=0)
    assert isinstance(model, VisionTransformer)
    assert model.num_patches == (32 // 4) ** 2
    assert model.pos_embed.shape == (1, 64 + (pool == "cls"), 64)
    assert (model.cls_token is not None) == (pool == "cls")
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 12)


def test_vit_mean_pooling_is_invariant_to_patch_order_without_position_embedding():
    # with the position embedding zeroed the patch tokens form a set: permuting whole patches leaves
    # the mean-pooled output unchanged -- checks the attention and pooling act over tokens as intended
    model = models.create("vit_tiny", embedding_size=8, image_size=8, seed=0).eval()
    with torch.no_grad():
        model.pos_embed.zero_()
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        swapped = torch.cat([x[..., 4:], x[..., :4]], dim=3)  # swap the left and right columns of patches
        torch.testing.assert_close(model(x), model(swapped), rtol=1e-5, atol=1e-5)
        model.pos_embed.normal_()
        assert not torch.allclose(model(x), model(swapped), atol=1e-3)


def test_vit_rejects_bad_options():
    with pytest.raises(ValueError, match="pool must be 'mean' or 'cls', got 'max'"):
        models.create("vit_tiny", embedding_size=8, image_size=32, pool="max")
    with pytest.raises(ValueError, match="dim=64 must be divisible by num_heads=5"):
        models.create("vit_tiny", embedding_size=8, image_size=32, num_heads=5)


# ---------------------------------------------------------------------------------------------- speed


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_models_train_a_32px_batch_of_64_quickly_on_one_core(name):
    model = models.create(name, embedding_size=64, image_size=32, seed=0)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(3):
        model.zero_grad()
        start = time.perf_counter()
        model(x).square().mean().backward()
        times.append(time.perf_counter() - start)
    # measured ~0.02-0.04 s on one core; generous bound for a shared machine
    assert min(times) < 0.5, f"{name}: forward+backward took {min(times):.3f} s"
