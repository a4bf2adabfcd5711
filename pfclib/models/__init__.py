"""Face-recognition backbones behind a registry.

Every backbone maps a batch of normalised RGB images ``(B, 3, image_size, image_size)`` (pixels
``(x/255 - 0.5)/0.5``) to un-normalised embeddings ``(B, embedding_size)``; the margin head
normalises them. Build one by name::

    from pfclib import models
    net = models.create("iresnet50", embedding_size=512, image_size=112)
    models.list_models()  # every registered name

Registered families (each in its own module, readable top to bottom):

- ``iresnet18/34/50/100`` (:mod:`pfclib.models.iresnet`): the improved ResNet of the ArcFace paper;
- ``mobilefacenet`` (:mod:`pfclib.models.mobilefacenet`): depthwise-separable bottlenecks with a
  global depthwise-convolution (GDC) head;
- ``vit_s`` (:mod:`pfclib.models.vit`): a small vision transformer;
- ``iresnet_tiny``, ``mobilefacenet_tiny``, ``vit_tiny``: the same code with few channels, for CPU
  tests and notebooks (a 32x32 batch of 64 trains forward+backward in a fraction of a second).

Add a backbone with the :func:`register` decorator on a factory
``fn(embedding_size: int, image_size: int, **kwargs) -> nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["create", "list_models", "register", "check_positive_int"]

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register ``fn(embedding_size, image_size, **kwargs) -> nn.Module`` under ``name``.

    Raises ``ValueError`` if ``name`` is already taken (names are global; pick a new one rather
    than silently replacing a backbone other code relies on).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive experiments)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    del _REGISTRY[name]


def list_models() -> list[str]:
    """All registered backbone names, sorted."""
    return sorted(_REGISTRY)


def check_positive_int(value: object, what: str) -> int:
    """Return ``value`` if it is a positive ``int`` (not a bool), else raise a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def create(
    name: str, embedding_size: int = 512, image_size: int = 112, *, seed: int | None = None, **kwargs
) -> nn.Module:
    """Build the backbone registered as ``name``.

    Args:
        name: a name from :func:`list_models`.
        embedding_size: output dimension D.
        image_size: side of the square input in pixels (112 for aligned faces); layers whose size
            depends on it (the FC after the last feature map, the GDC kernel, position embeddings)
            are sized from it.
        seed: if given, parameters are initialised from ``torch.manual_seed(seed)`` inside a forked
            RNG, so the same seed gives the same weights and the global RNG is left untouched.
        **kwargs: family-specific options (e.g. ``dropout`` for iresnet, ``pool`` for ViT).

    Returns:
        An ``nn.Module`` mapping ``(B, 3, image_size, image_size)`` float to ``(B, embedding_size)``,
        with attributes ``embedding_size`` and ``image_size``, in training mode on the CPU in fp32.

    Raises:
        ValueError: unknown ``name`` (the message lists the registered names), or an
            ``embedding_size``/``image_size`` the model cannot use.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}")
    check_positive_int(embedding_size, "embedding_size")
    check_positive_int(image_size, "image_size")
    factory = _REGISTRY[name]
    if seed is None:
        model = factory(embedding_size=embedding_size, image_size=image_size, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(embedding_size=embedding_size, image_size=image_size, **kwargs)
    model.embedding_size = embedding_size
    model.image_size = image_size
    return model


# Importing the family modules registers their names.
from pfclib.models import iresnet, mobilefacenet, vit  # noqa: E402, F401
