"""MobileFaceNet (Chen et al., 2018): a MobileNetV2-style network with a global depthwise head.

Layout for a 112x112 input (t: expansion, c: channels, n: repeats, s: stride of the first repeat)::

    conv3x3 (s2) 64 - BN - PReLU                                        56x56
    depthwise conv3x3 64 - BN - PReLU                                   56x56
    bottleneck t=2 c=64 n=5 s=2                                         28x28
    bottleneck t=4 c=128 n=1 s=2                                        14x14
    bottleneck t=2 c=128 n=6 s=1                                        14x14
    bottleneck t=4 c=128 n=1 s=2                                        7x7
    bottleneck t=2 c=128 n=2 s=1                                        7x7
    conv1x1 512 - BN - PReLU                                            7x7
    linear GDConv (depthwise, kernel = final map side, no padding) - BN 1x1
    linear conv1x1 -> D - BN                                            (B, D)

A bottleneck is expand conv1x1 - BN - PReLU - depthwise conv3x3(stride) - BN - PReLU - project
conv1x1 - BN (linear), with the input added when stride is 1 and the width is unchanged.
The GDC kernel is the final map side computed from ``image_size`` (112 -> 7, 32 -> 2): unlike global
average pooling it learns a different weight per spatial position, which matters for aligned faces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pfclib.models import check_positive_int, register
from pfclib.models.iresnet import final_map_size, init_conv_bn_

__all__ = ["Bottleneck", "MobileFaceNet", "PAPER_SETTINGS"]

# (expansion t, out channels c, repeats n, first stride s), from the paper's Table 1.
PAPER_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: expand 1x1 - depthwise 3x3(stride) - linear project 1x1."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone.

    Args:
        embedding_size: output dimension D (the paper uses 128; pfclib defaults to 512 like the others).
        image_size: input side in pixels; the GDC kernel is the final map side.
        stem_channels: channels of the first conv and depthwise conv.
        settings: bottleneck stages as ``(t, c, n, s)`` tuples.
        last_channels: width of the conv1x1 before the GDC head.
        dropout: dropout probability before the embedding layer.

    Input ``(B, 3, image_size, image_size)`` float, output ``(B, D)`` un-normalised.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        image_size: int = 112,
        stem_channels: int = 64,
        settings: Sequence[tuple[int, int, int, int]] = PAPER_SETTINGS,
        last_channels: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int(embedding_size, "embedding_size")
        check_positive_int(image_size, "image_size")
        check_positive_int(stem_channels, "stem_channels")
        check_positive_int(last_channels, "last_channels")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        for setting in settings:
            if len(setting) != 4 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in setting
            ):
                raise ValueError(
                    f"each bottleneck setting must be 4 positive ints (t, c, n, s), got {setting!r}"
                )
        num_stride2 = 1 + sum(1 for _, _, _, s in settings if s == 2)
        if any(s not in (1, 2) for _, _, _, s in settings):
            raise ValueError(f"bottleneck strides must be 1 or 2, got settings={list(settings)}")
        if image_size < 2**num_stride2:
            raise ValueError(
                f"MobileFaceNet with {num_stride2} stride-2 layers needs image_size >= {2**num_stride2}, "
                f"got {image_size}; faces use 112"
            )
        self.embedding_size = embedding_size
        self.image_size = image_size
        self.map_size = final_map_size(image_size, num_stride2)

        layers: list[nn.Module] = [
            _conv_bn(3, stem_channels, 3, stride=2),
            _conv_bn(stem_channels, stem_channels, 3, groups=stem_channels),
        ]
        cin = stem_channels
        for t, c, n, s in settings:
            for i in range(n):
                layers.append(Bottleneck(cin, c, stride=s if i == 0 else 1, expansion=t))
                cin = c
        layers.append(_conv_bn(cin, last_channels, 1))
        self.features = nn.Sequential(*layers)
        # Linear global depthwise convolution: one k x k filter per channel over the whole map.
        self.gdc = nn.Sequential(
            nn.Conv2d(last_channels, last_channels, self.map_size, groups=last_channels, bias=False),
            nn.BatchNorm2d(last_channels),
        )
        self.dropout = nn.Dropout(p=dropout)
        self.embedding = nn.Linear(last_channels, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gdc(self.features(x))
        return self.bn(self.embedding(self.dropout(torch.flatten(x, 1))))


@register("mobilefacenet")
def mobilefacenet(embedding_size: int, image_size: int, **kwargs) -> MobileFaceNet:
    """MobileFaceNet with the paper's layout (about 1M parameters at D=128)."""
    return MobileFaceNet(embedding_size=embedding_size, image_size=image_size, **kwargs)


@register("mobilefacenet_tiny")
def mobilefacenet_tiny(embedding_size: int, image_size: int, **kwargs) -> MobileFaceNet:
    """CPU-sized MobileFaceNet: stem 16, four single-repeat bottleneck stages of 16-32 channels."""
    kwargs.setdefault("stem_channels", 16)
    kwargs.setdefault("settings", ((2, 16, 1, 2), (2, 32, 1, 2), (2, 32, 1, 1), (2, 32, 1, 2)))
    kwargs.setdefault("last_channels", 64)
    return MobileFaceNet(embedding_size=embedding_size, image_size=image_size, **kwargs)
