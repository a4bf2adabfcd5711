"""IResNet: the improved residual network of the ArcFace paper (Deng et al., CVPR 2019).

Layout (for a 112x112 input, widths 64-128-256-512)::

    stem    conv3x3(3->64, stride 1) - BN - PReLU                      112x112
    stage i blocks of IBasicBlock, the first with stride 2            56, 28, 14, 7
    output  BN2d - dropout - flatten - FC(512*7*7 -> D) - BN1d        (B, D)

IBasicBlock (pre-activation style, no ReLU after the addition)::

    x -> BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN  (+ shortcut: conv1x1(stride) - BN when the shape changes)

Block counts per stage: iresnet18 [2,2,2,2], iresnet34 [3,4,6,3], iresnet50 [3,4,14,3],
iresnet100 [3,13,30,3]. The final map side is computed from ``image_size`` (each stride-2 3x3
convolution with padding 1 maps n to ceil(n/2)): 112 -> 7, 32 -> 2; so is the FC input size.

The last BN1d ("features") has its scale fixed to 1 (``requires_grad=False``) as in the reference
implementation: only its shift is learned, so the embedding norm is not a free parameter of the
output layer. ``fix_feature_scale=False`` makes it learnable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pfclib.models import check_positive_int, register

__all__ = ["IBasicBlock", "IResNet", "LAYOUTS", "final_map_size", "init_conv_bn_"]

LAYOUTS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
BN_EPS = 1e-5


def final_map_size(image_size: int, num_stride2: int = 4) -> int:
    """Side of the feature map after ``num_stride2`` stride-2 3x3 convolutions with padding 1."""
    size = image_size
    for _ in range(num_stride2):
        size = (size + 1) // 2
    return size


def init_conv_bn_(module: nn.Module) -> None:
    """In place: Kaiming-normal (fan-out) convolutions, BN scale 1 and shift 0, for every submodule.
    Linear layers keep PyTorch's default initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """Improved ResNet backbone.

    Args:
        layers: blocks per stage (4 stages).
        embedding_size: output dimension D.
        image_size: input side in pixels; the FC input is ``widths[-1] * final_map_size(image_size)**2``.
        widths: channels per stage (the stem has ``widths[0]``).
        dropout: dropout probability before the FC (0 in the reference recipes).
        fix_feature_scale: freeze the output BN1d scale at 1 (reference behaviour).
        zero_init_residual: initialise each block's last BN scale to 0, so blocks start as identities.

    Input ``(B, 3, image_size, image_size)`` float, output ``(B, D)`` un-normalised.
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        image_size: int = 112,
        widths: Sequence[int] = (64, 128, 256, 512),
        dropout: float = 0.0,
        fix_feature_scale: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet needs 4 stages: got layers={list(layers)}, widths={list(widths)}")
        for n in layers:
            check_positive_int(n, f"blocks per stage (layers={list(layers)})")
        for w in widths:
            check_positive_int(w, f"stage width (widths={list(widths)})")
        check_positive_int(embedding_size, "embedding_size")
        check_positive_int(image_size, "image_size")
        if image_size < 16:
            raise ValueError(
                f"IResNet needs image_size >= 16 (four stride-2 stages), got {image_size}; faces use 112"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        self.layers = tuple(layers)
        self.embedding_size = embedding_size
        self.image_size = image_size
        self.map_size = final_map_size(image_size)

        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        stages = []
        cin = widths[0]
        for n_blocks, cout in zip(layers, widths):
            blocks = [IBasicBlock(cin, cout, stride=2)]
            blocks += [IBasicBlock(cout, cout) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[-1] * self.map_size**2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights(zero_init_residual)
        if fix_feature_scale:
            self.features.weight.requires_grad_(False)

    def _init_weights(self, zero_init_residual: bool) -> None:
        init_conv_bn_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def _make(layout: str):
    def factory(embedding_size: int, image_size: int, **kwargs) -> IResNet:
        return IResNet(LAYOUTS[layout], embedding_size=embedding_size, image_size=image_size, **kwargs)

    factory.__qualname__ = f"{layout}_factory"
    factory.__doc__ = (
        f"{layout}: IResNet with blocks per stage {list(LAYOUTS[layout])}, widths 64-128-256-512."
    )
    return factory


for _name in LAYOUTS:
    register(_name)(_make(_name))


@register("iresnet_tiny")
def iresnet_tiny(embedding_size: int, image_size: int, **kwargs) -> IResNet:
    """CPU-sized IResNet: one block per stage, widths 8-16-32-64 (for 32x32 inputs)."""
    kwargs.setdefault("widths", (8, 16, 32, 64))
    return IResNet((1, 1, 1, 1), embedding_size=embedding_size, image_size=image_size, **kwargs)
