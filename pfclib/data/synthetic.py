"""Synthetic face-like identities with the truth kept: a seeded stand-in for WebFace/MS1M on a CPU.

**Identities.** Identity ``i`` has a latent code ``z_i`` (``code_dim`` standard normals; with
``identity_similarity = rho`` the codes share a common part: ``z_i = sqrt(rho) z_0 + sqrt(1 - rho) e_i``).
A fixed renderer -- a random linear map seeded by ``renderer_seed`` followed by ``tanh`` -- turns a
code into ~60 face parameters: head ellipse, skin and hair colour, hairline, eye/brow/nose/mouth
positions, sizes and colours, a few marks, and a low-frequency skin texture. Nothing is learned.

**Images.** Each image renders its identity under nuisance: an expression jitter of the code
(``expression``), an in-plane pose (rotation, scale, shift), lighting (colour gain, linear
gradient, offset), a random background, pixel noise and, with probability ``occlusion_prob``, a
rectangle occluding part of the image; optionally a blur, a per-image noise level and extreme
rotations, each recorded per image (below). ``nuisance`` scales pose and lighting together. Rendering is
vectorised numpy in fixed-size chunks, deterministic for a given config (same bytes every run).

**Recorded degradations** (the truth for image-quality studies, e.g. CR-FIQA). Per image, in this
order: the scene is rendered and lit; with probability ``blur_prob`` it is blurred by a Gaussian of
sigma uniform in ``(0, blur_max]`` *pixels* (at ``image_size``; separable, borders mirrored); pixel
noise is added, of std ``noise_std`` or, when ``noise_std_max`` is set, uniform in ``[noise_std,
noise_std_max]`` per image (a fraction of the 0..1 range, before clipping and quantisation); the
occluder is pasted (a flat, sharp, noise-free rectangle, as before); the result is quantised to
``uint8``. The pose's rotation is drawn as before (normal, sd ``10 * nuisance`` degrees), except
that with probability ``pose_extreme_prob`` it is replaced by one of magnitude uniform in
``[pose_extreme_deg / 2, pose_extreme_deg]`` degrees and random sign (not scaled by ``nuisance``;
scale and shift are kept). Recorded per image: ``blur_sigma`` (0 = not blurred), ``noise_std``,
``pose_deg`` (``|rotation|`` in degrees) and ``occluded``. Each option draws from its own random
stream and does nothing when off (the defaults ``blur_prob = 0``, ``noise_std_max = None``,
``pose_extreme_prob = 0``), so with the defaults the images, labels and pairs are those of datasets
generated before these options existed, and turning one option on changes nothing drawn for the
others (un-blurred images keep their bytes when only blur is on).

**Class sizes.** ``"uniform"``: ``images_per_identity`` each. ``"power"``: sizes drawn i.i.d. from
the truncated discrete power law ``P(n) ∝ n^(-power_exponent)`` on ``[min_images, max_images]``.

**Label noise** (applied in this order).
*Conflict*: exactly ``round(conflict_fraction * num_identities)`` identities (chosen among those
with at least ``conflict_splits`` images) have their images split at random into ``conflict_splits``
non-empty parts; part 0 keeps the identity's label, the others get new labels appended after
``num_identities`` (so ``num_classes`` grows). *Flips*: exactly ``round(flip_fraction * num_images)``
images get a label drawn uniformly among the labels of *other* identities.

**Held-out identities** (never in train) render ``heldout_images_per_identity`` images each;
``num_pairs`` verification pairs (half genuine, half impostor, seeded, order shuffled) are drawn from them.

**On disk** (``generate(cfg, out_dir)``), written to a temporary folder and renamed into place::

    out_dir/train    datasets: image Array3D uint8 (3,S,S), label, identity, flipped, conflict, occluded,
                     blur_sigma, noise_std, pose_deg (float32)
    out_dir/heldout  datasets: image, identity (ids num_identities .. num_identities+heldout_identities-1),
                     occluded, blur_sigma, noise_std, pose_deg
    out_dir/pairs    datasets: image_a, image_b, issame, identity_a, identity_b, index_a, index_b,
                     occluded_a, occluded_b, blur_sigma_a, blur_sigma_b, noise_std_a, noise_std_b,
                     pose_deg_a, pose_deg_b (the held-out images' truth at index_a / index_b)
    out_dir/meta.json counts (num_occluded, num_blurred, num_pose_extreme and the mean blur_sigma,
                     noise_std and pose_deg, for train at the top level and under "heldout"),
                     class sizes, label -> identity map, conflict ids, config, seed

CLI (reads a YAML section of SyntheticConfig fields, e.g. from ``params.yaml``)::

    python -m pfclib.data.synthetic --params params.yaml --section data.synthetic --out data/synthetic/NAME \
        [--set flip_fraction=0.4 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pfclib.data.base import as_path
from pfclib.data.hf import HFImageDataset, offline

__all__ = [
    "FORMAT",
    "SyntheticConfig",
    "SyntheticDataset",
    "SyntheticRenderer",
    "TRUTH_COLUMNS",
    "apply_label_noise",
    "class_sizes",
    "gaussian_blur",
    "generate",
    "load_meta",
    "main",
    "make_pairs",
    "render_images",
    "render_images_with_truth",
]

FORMAT = "pfclib-synthetic/1"


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines a synthetic dataset (same config -> identical bytes).

    Sizes: ``num_identities`` training identities; ``distribution`` ``"uniform"``
    (``images_per_identity`` each) or ``"power"`` (``P(n) ∝ n^-power_exponent`` on
    ``[min_images, max_images]``). ``image_size`` in pixels (32 for CPU work, 112 like real data).
    Noise: ``flip_fraction`` of images relabelled to another identity; ``conflict_fraction`` of
    identities split over ``conflict_splits`` labels. Evaluation: ``heldout_identities`` unseen
    identities with ``heldout_images_per_identity`` images; ``num_pairs`` (even) balanced pairs.
    Difficulty: ``identity_similarity`` in ``[0, 1)`` (1 = all identities alike),
    ``expression`` (code jitter per image, in code standard deviations), ``nuisance`` (scales pose
    and lighting), ``noise_std`` (pixel noise, fraction of the 0..1 range), ``occlusion_prob``.
    Recorded per-image degradations (all off by default; off = the images of earlier versions):
    ``blur_prob`` of the images get a Gaussian blur of sigma uniform in ``(0, blur_max]`` pixels;
    ``noise_std_max`` (``None`` = every image has ``noise_std``) draws each image's pixel-noise std
    uniformly in ``[noise_std, noise_std_max]``; ``pose_extreme_prob`` of the images get a rotation of
    magnitude uniform in ``[pose_extreme_deg / 2, pose_extreme_deg]`` degrees (random sign) instead of
    the ordinary one.
    ``seed`` draws the data; ``renderer_seed`` fixes the renderer (keep it to compare datasets).
    """

    num_identities: int = 100
    images_per_identity: int = 20
    distribution: str = "uniform"
    power_exponent: float = 1.5
    min_images: int = 2
    max_images: int = 100
    image_size: int = 32
    flip_fraction: float = 0.0
    conflict_fraction: float = 0.0
    conflict_splits: int = 2
    heldout_identities: int = 50
    heldout_images_per_identity: int = 4
    num_pairs: int = 600
    code_dim: int = 16
    identity_similarity: float = 0.0
    expression: float = 0.35
    nuisance: float = 1.0
    noise_std: float = 0.03
    occlusion_prob: float = 0.1
    blur_prob: float = 0.0
    blur_max: float = 1.5
    noise_std_max: float | None = None
    pose_extreme_prob: float = 0.0
    pose_extreme_deg: float = 60.0
    seed: int = 0
    renderer_seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig.{field}={getattr(self, field)!r}; expected {expected}")

        ints = [f.name for f in dataclasses.fields(self) if f.type in ("int", int)]
        for name in ints:
            value = getattr(self, name)
            need(isinstance(value, (int, np.integer)) and not isinstance(value, bool), name, "an int")
        need(self.num_identities >= 1, "num_identities", ">= 1")
        need(self.distribution in ("uniform", "power"), "distribution", "'uniform' or 'power'")
        if self.distribution == "uniform":
            need(self.images_per_identity >= 1, "images_per_identity", ">= 1")
        else:
            need(self.min_images >= 1, "min_images", ">= 1")
            need(self.max_images >= self.min_images, "max_images", f">= min_images={self.min_images}")
            need(math.isfinite(self.power_exponent), "power_exponent", "a finite float")
        need(self.image_size >= 8, "image_size", ">= 8 pixels")
        need(0.0 <= self.flip_fraction < 1.0, "flip_fraction", "in [0, 1)")
        need(0.0 <= self.conflict_fraction <= 1.0, "conflict_fraction", "in [0, 1]")
        need(self.conflict_splits >= 2, "conflict_splits", ">= 2")
        if self.flip_fraction > 0:
            need(self.num_identities >= 2, "num_identities", ">= 2 when flip_fraction > 0")
        need(self.heldout_identities >= 0, "heldout_identities", ">= 0")
        need(
            self.num_pairs >= 0 and self.num_pairs % 2 == 0, "num_pairs", "an even number >= 0 (half genuine)"
        )
        if self.num_pairs:
            need(self.heldout_identities >= 2, "heldout_identities", ">= 2 when num_pairs > 0")
            need(
                self.heldout_images_per_identity >= 2,
                "heldout_images_per_identity",
                ">= 2 when num_pairs > 0",
            )
        need(self.heldout_images_per_identity >= 0, "heldout_images_per_identity", ">= 0")
        need(self.code_dim >= 1, "code_dim", ">= 1")
        need(0.0 <= self.identity_similarity < 1.0, "identity_similarity", "in [0, 1)")
        for name in ("expression", "nuisance", "noise_std"):
            need(getattr(self, name) >= 0.0, name, ">= 0")
        need(0.0 <= self.occlusion_prob <= 1.0, "occlusion_prob", "in [0, 1]")
        floats = ("noise_std", "blur_prob", "blur_max", "pose_extreme_prob", "pose_extreme_deg")
        for name in floats + (("noise_std_max",) if self.noise_std_max is not None else ()):
            value = getattr(self, name)
            need(
                isinstance(value, (int, float, np.integer, np.floating))
                and not isinstance(value, bool)
                and math.isfinite(value),
                name,
                "a finite number" + (" or None" if name == "noise_std_max" else ""),
            )
        need(0.0 <= self.blur_prob <= 1.0, "blur_prob", "in [0, 1] (the fraction of images blurred)")
        need(self.blur_max >= 0.0, "blur_max", ">= 0 (the largest blur sigma, in pixels)")
        if self.blur_prob > 0:
            need(
                self.blur_max > 0.0, "blur_max", "> 0 when blur_prob > 0 (sigma is uniform in (0, blur_max])"
            )
        if self.noise_std_max is not None:
            need(
                self.noise_std_max >= self.noise_std,
                "noise_std_max",
                f">= noise_std={self.noise_std} (each image's std is uniform in [noise_std, noise_std_max]) or None",
            )
        need(0.0 <= self.pose_extreme_prob <= 1.0, "pose_extreme_prob", "in [0, 1]")
        need(0.0 < self.pose_extreme_deg <= 180.0, "pose_extreme_deg", "in (0, 180] degrees")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SyntheticConfig:
        """Build from a plain dict (e.g. a YAML section); unknown keys raise, naming the valid ones."""
        if not isinstance(values, dict):
            raise TypeError(f"expected a dict of SyntheticConfig fields, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown SyntheticConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Renderer


# Each face parameter p = centre + half_range * tanh(linear(code)).
# (name, centre, half_range); names with a _r/_g/_b suffix are colours in [0, 1].
_PARAMS: tuple[tuple[str, float, float], ...] = (
    ("face_cy", 0.04, 0.06),
    ("face_rx", 0.58, 0.07),
    ("face_ry", 0.76, 0.07),
    ("face_shift", 0.0, 0.04),
    ("skin_r", 0.76, 0.17),
    ("skin_g", 0.58, 0.15),
    ("skin_b", 0.47, 0.13),
    ("hair_r", 0.30, 0.22),
    ("hair_g", 0.22, 0.16),
    ("hair_b", 0.16, 0.12),
    ("hairline", -0.42, 0.16),
    ("hair_width", 1.08, 0.06),
    ("eye_dx", 0.26, 0.06),
    ("eye_y", -0.10, 0.06),
    ("eye_sx", 0.085, 0.025),
    ("eye_sy", 0.05, 0.02),
    ("eye_r", 0.22, 0.16),
    ("eye_g", 0.20, 0.14),
    ("eye_b", 0.24, 0.16),
    ("brow_dy", 0.13, 0.04),
    ("brow_sx", 0.12, 0.035),
    ("brow_sy", 0.03, 0.012),
    ("brow_tilt", 0.0, 0.35),
    ("nose_y", 0.14, 0.05),
    ("nose_sx", 0.05, 0.015),
    ("nose_sy", 0.12, 0.04),
    ("nose_shade", 0.22, 0.12),
    ("mouth_y", 0.42, 0.06),
    ("mouth_sx", 0.16, 0.05),
    ("mouth_sy", 0.04, 0.015),
    ("mouth_r", 0.62, 0.18),
    ("mouth_g", 0.30, 0.12),
    ("mouth_b", 0.30, 0.12),
    *(
        (f"mark{k}_{p}", c, h)
        for k in range(3)
        for p, c, h in (("x", 0.0, 0.4), ("y", 0.1, 0.45), ("s", 0.06, 0.03), ("v", 0.0, 0.35))
    ),
    *((f"tex{k}_{ch}", 0.0, 0.07) for k in range(6) for ch in "rgb"),
)
_INDEX = {name: i for i, (name, _, _) in enumerate(_PARAMS)}
# Low-frequency texture bases: cos(pi * (kx u + ky v) + phase).
_TEX_FREQ = np.array([(1, 0), (0, 1), (1, 1), (1, -1), (2, 0), (0, 2)], dtype=np.float32)


class SyntheticRenderer:
    """The fixed, seeded map from (identity code, nuisance) to an RGB ``uint8`` image.

    ``renderer_seed`` fixes the linear map from codes to face parameters and the texture phases;
    ``code_dim`` is the code length. Stateless otherwise: all randomness is passed in.
    """

    def __init__(self, code_dim: int, renderer_seed: int = 0) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([renderer_seed, 0x5EED]))
        n = len(_PARAMS)
        self.code_dim = code_dim
        self.weight = (rng.standard_normal((n, code_dim)) / math.sqrt(code_dim)).astype(np.float32)
        self.bias = (0.3 * rng.standard_normal(n)).astype(np.float32)
        self.centre = np.array([c for _, c, _ in _PARAMS], dtype=np.float32)
        self.half_range = np.array([h for _, _, h in _PARAMS], dtype=np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, len(_TEX_FREQ)).astype(np.float32)

    def face_params(self, codes: np.ndarray) -> np.ndarray:
        """Codes ``(n, code_dim)`` -> face parameters ``(n, P)`` (see ``_PARAMS``)."""
        pre = codes.astype(np.float32) @ self.weight.T + self.bias
        return self.centre + self.half_range * np.tanh(pre)

    def render(
        self,
        codes: np.ndarray,
        nuisance: dict[str, np.ndarray],
        size: int,
        noise: np.ndarray,
        blur_sigma: np.ndarray | None = None,
    ) -> np.ndarray:
        """Render ``n`` images ``uint8 (n, 3, size, size)``.

        ``codes`` ``(n, code_dim)`` already include expression jitter; ``nuisance`` holds per-image
        arrays (see :func:`_draw_nuisance`); ``noise`` is ``(n, 3, size, size)`` standard normal
        scaled by the caller. ``blur_sigma`` ``(n,)`` (pixels; ``0`` = none) blurs the lit image of
        each image with ``sigma > 0`` (:func:`gaussian_blur`) before the noise is added; the others
        are untouched. Order: scene and lighting, blur, noise, occluder, quantisation.
        """
        p = self.face_params(codes)
        n = len(codes)

        def col(name: str) -> np.ndarray:
            return p[:, _INDEX[name]].reshape(n, 1, 1)

        def rgb(prefix: str) -> np.ndarray:
            return p[:, [_INDEX[f"{prefix}_{c}"] for c in "rgb"]].reshape(n, 3, 1, 1)

        grid = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
        gy, gx = np.meshgrid(grid, grid, indexing="ij")  # (S, S), y down
        # Pose: image coordinates -> face coordinates (inverse rotation / scale / shift).
        th = nuisance["rotation"].reshape(n, 1, 1)
        sc = nuisance["scale"].reshape(n, 1, 1)
        dx = gx[None] - nuisance["shift_x"].reshape(n, 1, 1)
        dy = gy[None] - nuisance["shift_y"].reshape(n, 1, 1)
        cos, sin = np.cos(th), np.sin(th)
        u = (cos * dx + sin * dy) / sc
        v = (-sin * dx + cos * dy) / sc

        def blob(
            cx: np.ndarray, cy: np.ndarray, sx: np.ndarray, sy: np.ndarray, tilt: np.ndarray | None = None
        ):
            du, dv = u - cx, v - cy
            if tilt is not None:
                ct, st = np.cos(tilt), np.sin(tilt)
                du, dv = ct * du + st * dv, -st * du + ct * dv
            return np.exp(-0.5 * ((du / sx) ** 2 + (dv / sy) ** 2))

        def sigmoid(x: np.ndarray) -> np.ndarray:
            return 0.5 * (1.0 + np.tanh(0.5 * x))

        fx = u - col("face_shift")
        fv = v - col("face_cy")
        radius = np.sqrt((fx / col("face_rx")) ** 2 + (fv / col("face_ry")) ** 2)
        soft = 0.035
        face_alpha = sigmoid((1.0 - radius) / soft)
        hair_radius = np.sqrt(
            (fx / (col("face_rx") * col("hair_width"))) ** 2 + (fv / (col("face_ry") * 1.06)) ** 2
        )
        hair_alpha = sigmoid((1.0 - hair_radius) / soft) * sigmoid((col("hairline") - v) / 0.04)
        # Skin with a low-frequency texture.
        color = np.broadcast_to(rgb("skin"), (n, 3, size, size)).copy()
        tex = np.stack(
            [np.cos(np.pi * (fx_ * u + fy_ * v) + ph) for (fx_, fy_), ph in zip(_TEX_FREQ, self.phase)],
            axis=1,
        )  # (n, 6, S, S)
        coef = p[:, [_INDEX[f"tex{k}_{c}"] for k in range(6) for c in "rgb"]].reshape(n, 6, 3)
        color += np.einsum("nkc,nkhw->nchw", coef, tex, optimize=True)
        # Marks (moles / patches): multiplicative shading.
        for k in range(3):
            g = blob(col(f"mark{k}_x"), col(f"mark{k}_y"), col(f"mark{k}_s"), col(f"mark{k}_s"))
            color *= 1.0 + col(f"mark{k}_v")[:, None] * g[:, None]
        # Nose: a shading stripe slightly off-centre, darkening.
        nose = blob(col("face_shift") + 0.03, col("nose_y"), col("nose_sx"), col("nose_sy"))
        color *= 1.0 - col("nose_shade")[:, None] * nose[:, None]

        def paint(mask: np.ndarray, paint_rgb: np.ndarray, opacity: float) -> None:
            a = opacity * mask[:, None]
            color[:] = color * (1.0 - a) + paint_rgb * a

        ex, ey = col("eye_dx"), col("eye_y")
        for side in (-1.0, 1.0):
            cx = col("face_shift") + side * ex
            paint(blob(cx, ey, col("eye_sx"), col("eye_sy")), rgb("eye"), 0.92)
            brow = blob(cx, ey - col("brow_dy"), col("brow_sx"), col("brow_sy"), side * col("brow_tilt"))
            paint(brow, rgb("hair") * 0.8, 0.85)
        paint(blob(col("face_shift"), col("mouth_y"), col("mouth_sx"), col("mouth_sy")), rgb("mouth"), 0.88)
        # Compose: hair over the top of the head, then the head onto the background.
        head_alpha = np.maximum(face_alpha, hair_alpha)[:, None]
        paint(hair_alpha, rgb("hair"), 1.0)
        head = color
        bg = nuisance["background"].reshape(n, 3, 1, 1) * (
            1.0 + nuisance["bg_gradient"].reshape(n, 1, 1, 1) * gx[None, None]
        )
        img = bg * (1.0 - head_alpha) + head * head_alpha
        # Lighting in image coordinates: colour gain, linear gradient, offset.
        light = (
            1.0 + nuisance["light_x"].reshape(n, 1, 1, 1) * gx + nuisance["light_y"].reshape(n, 1, 1, 1) * gy
        )
        img = img * nuisance["gain"].reshape(n, 3, 1, 1) * light + nuisance["offset"].reshape(n, 1, 1, 1)
        if blur_sigma is not None:
            sigma = np.asarray(blur_sigma).reshape(n)
            which = np.flatnonzero(sigma > 0)
            if len(which):
                img[which] = gaussian_blur(img[which], sigma[which])
        img += noise
        # Occlusion: a flat rectangle.
        occ = nuisance["occluded"].reshape(n, 1, 1, 1)
        if occ.any():
            ox, oy = nuisance["occ_x"].reshape(n, 1, 1), nuisance["occ_y"].reshape(n, 1, 1)
            ow, oh = nuisance["occ_w"].reshape(n, 1, 1), nuisance["occ_h"].reshape(n, 1, 1)
            inside = (np.abs(gx - ox) < ow / 2) & (np.abs(gy - oy) < oh / 2)
            mask = occ & inside[:, None]
            img = np.where(mask, nuisance["occ_color"].reshape(n, 3, 1, 1), img)
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def gaussian_blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Blur each image of ``images`` ``(n, C, H, W)`` (float) with its own Gaussian ``sigma`` ``(n,)`` (pixels, > 0).

    Separable: one 1-D kernel per image along the width, then the height, with taps ``|k| <=
    ceil(4 sigma)`` (normalised to sum 1) and symmetric padding at the borders (``d c b a | a b c
    d``). Vectorised over images; an image's result depends only on its own pixels and sigma (taps
    beyond its support weigh exactly 0), so it does not depend on which images share the call.
    Returns a new array of the dtype of ``images``.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (n, C, H, W), got shape {images.shape}")
    n = len(images)
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
    if len(sigma) != n:
        raise ValueError(f"{len(sigma)} sigmas for {n} images")
    if n == 0:
        return images.copy()
    if not (np.isfinite(sigma).all() and (sigma > 0).all()):
        raise ValueError(f"blur sigmas must be finite and > 0, got min {sigma.min()}, max {sigma.max()}")
    radii = np.ceil(4.0 * sigma).astype(np.int64)
    r = int(radii.max())
    taps = np.arange(-r, r + 1)
    weight = np.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    weight[np.abs(taps)[None, :] > radii[:, None]] = 0.0
    weight /= weight.sum(axis=1, keepdims=True)
    weight = weight.astype(images.dtype)
    out = images
    for axis in (3, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="symmetric")
        length = out.shape[axis]
        acc = np.zeros_like(out)
        for j in range(len(taps)):
            window = [slice(None)] * 4
            window[axis] = slice(j, j + length)
            acc += weight[:, j].reshape(n, 1, 1, 1) * padded[tuple(window)]
        out = acc
    return out


def _draw_nuisance(rng: np.random.Generator, n: int, cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Per-image nuisance parameters for ``n`` images (fixed draw order: part of the format)."""
    s = cfg.nuisance
    f32 = np.float32
    out = {
        "rotation": rng.normal(0.0, math.radians(10.0) * s, n),
        "scale": np.exp(rng.normal(0.0, 0.08 * s, n)),
        "shift_x": rng.normal(0.0, 0.06 * s, n),
        "shift_y": rng.normal(0.0, 0.06 * s, n),
        "gain": np.exp(rng.normal(0.0, 0.18 * s, (n, 1)) + rng.normal(0.0, 0.07 * s, (n, 3))),
        "light_x": rng.normal(0.0, 0.22 * s, n),
        "light_y": rng.normal(0.0, 0.12 * s, n),
        "offset": rng.normal(0.0, 0.04 * s, n),
        "background": rng.uniform(0.05, 0.95, (n, 3)),
        "bg_gradient": rng.normal(0.0, 0.3, n),
        "occluded": rng.random(n) < cfg.occlusion_prob,
        "occ_x": rng.uniform(-0.6, 0.6, n),
        "occ_y": rng.uniform(-0.6, 0.6, n),
        "occ_w": rng.uniform(0.3, 0.8, n),
        "occ_h": rng.uniform(0.3, 0.8, n),
        "occ_color": rng.uniform(0.0, 1.0, (n, 3)),
        "expression": rng.standard_normal((n, cfg.code_dim)),
    }
    return {k: (v if v.dtype == bool else v.astype(f32)) for k, v in out.items()}


def _child(seq: np.random.SeedSequence, *keys: int) -> np.random.SeedSequence:
    # A child stream named by keys; unlike SeedSequence.spawn it does not depend on earlier calls.
    return np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, *keys))


def _chunk_images(image_size: int) -> int:
    # Fixed per image size (results must not depend on anything else): ~1M pixels per chunk.
    return max(1, (1 << 20) // (image_size * image_size))


# Child streams of an image set's seed sequence (keys are part of the format):
#   (0,)      nuisance, all images (:func:`_draw_nuisance`)
#   (1, c)    pixel noise of chunk c
#   (2, 0)    blur: which images, and sigma          (only used when blur_prob > 0)
#   (2, 1)    per-image noise std                     (only used when noise_std_max is set)
#   (2, 2)    extreme poses: which images, magnitude, sign (only used when pose_extreme_prob > 0)
# Each recorded degradation has its own stream, so turning one on changes nothing drawn for the others.

TRUTH_COLUMNS: tuple[str, ...] = ("occluded", "blur_sigma", "noise_std", "pose_deg")
"""Per-image truth recorded for every image (train, heldout; ``_a``/``_b`` in pairs)."""


def _draw_degradations(
    seed_seq: np.random.SeedSequence, n: int, cfg: SyntheticConfig, rotation: np.ndarray
) -> dict[str, np.ndarray]:
    # Per-image blur sigma, noise std and the rotation actually used (radians), all float32.
    f32 = np.float32
    blur_sigma = np.zeros(n, dtype=f32)
    if cfg.blur_prob > 0:
        rng = np.random.default_rng(_child(seed_seq, 2, 0))
        blurred = rng.random(n) < cfg.blur_prob
        sigma = cfg.blur_max * (1.0 - rng.random(n))  # uniform in (0, blur_max]
        blur_sigma = np.where(blurred, sigma, 0.0).astype(f32)
    if cfg.noise_std_max is None:
        noise_std = np.full(n, cfg.noise_std, dtype=f32)
    else:
        rng = np.random.default_rng(_child(seed_seq, 2, 1))
        noise_std = rng.uniform(cfg.noise_std, cfg.noise_std_max, n).astype(f32)
    extreme = np.zeros(n, dtype=bool)
    if cfg.pose_extreme_prob > 0:
        rng = np.random.default_rng(_child(seed_seq, 2, 2))
        extreme = rng.random(n) < cfg.pose_extreme_prob
        magnitude = np.radians(cfg.pose_extreme_deg * rng.uniform(0.5, 1.0, n))
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        rotation = np.where(extreme, sign * magnitude, rotation).astype(f32)
    return {"blur_sigma": blur_sigma, "noise_std": noise_std, "rotation": rotation, "pose_extreme": extreme}


def render_images_with_truth(
    renderer: SyntheticRenderer,
    codes: np.ndarray,
    cfg: SyntheticConfig,
    seed_seq: np.random.SeedSequence,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one image per row of ``codes`` ``(n, code_dim)`` (identity codes, before expression).

    Returns ``uint8 (n, 3, S, S)`` and the per-image truth ``{name: (n,)}`` for
    :data:`TRUTH_COLUMNS`: ``occluded`` (bool), ``blur_sigma`` (float32 pixels, 0 = not blurred),
    ``noise_std`` (float32, the pixel-noise std as a fraction of the 0..1 range), ``pose_deg``
    (float32, ``|rotation|`` in degrees), plus ``pose_extreme`` (bool). All randomness comes from
    ``seed_seq``: nuisance and degradations are drawn for all images first, pixel noise per
    fixed-size chunk (streams listed above this function).
    """
    n, size = len(codes), cfg.image_size
    nz = _draw_nuisance(np.random.default_rng(_child(seed_seq, 0)), n, cfg)
    deg = _draw_degradations(seed_seq, n, cfg, nz["rotation"])
    nz["rotation"] = deg["rotation"]
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    chunk = _chunk_images(size)
    for c, start in enumerate(range(0, n, chunk)):
        stop = min(n, start + chunk)
        noise_rng = np.random.default_rng(_child(seed_seq, 1, c))
        noise = noise_rng.standard_normal((stop - start, 3, size, size), dtype=np.float32)
        if cfg.noise_std_max is None:
            noise *= np.float32(cfg.noise_std)
        else:
            noise *= deg["noise_std"][start:stop].reshape(-1, 1, 1, 1)
        part = {k: v[start:stop] for k, v in nz.items()}
        chunk_codes = codes[start:stop] + cfg.expression * part["expression"]
        sigma = deg["blur_sigma"][start:stop] if cfg.blur_prob > 0 else None
        out[start:stop] = renderer.render(chunk_codes, part, size, noise, blur_sigma=sigma)
    truth = {
        "occluded": nz["occluded"].copy(),
        "blur_sigma": deg["blur_sigma"],
        "noise_std": deg["noise_std"],
        "pose_deg": np.degrees(np.abs(deg["rotation"].astype(np.float64))).astype(np.float32),
        "pose_extreme": deg["pose_extreme"],
    }
    return out, truth


def render_images(
    renderer: SyntheticRenderer,
    codes: np.ndarray,
    cfg: SyntheticConfig,
    seed_seq: np.random.SeedSequence,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_images_with_truth` returning only the images and the occlusion flags ``(n,)``."""
    images, truth = render_images_with_truth(renderer, codes, cfg, seed_seq)
    return images, truth["occluded"]


# --------------------------------------------------------------------------------------------
# Class sizes, label noise, pairs


def class_sizes(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Images per identity, ``int64 (num_identities,)`` (see the module docstring)."""
    if cfg.distribution == "uniform":
        return np.full(cfg.num_identities, cfg.images_per_identity, dtype=np.int64)
    support = np.arange(cfg.min_images, cfg.max_images + 1, dtype=np.float64)
    pmf = support ** (-cfg.power_exponent)
    pmf /= pmf.sum()
    return rng.choice(support.astype(np.int64), size=cfg.num_identities, p=pmf)


def power_law_pmf(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """The class-size distribution of a ``"power"`` config: support ``(K,)`` and probabilities ``(K,)``."""
    support = np.arange(cfg.min_images, cfg.max_images + 1)
    pmf = support.astype(np.float64) ** (-cfg.power_exponent)
    return support, pmf / pmf.sum()


@dataclass
class LabelNoise:
    """Result of :func:`apply_label_noise`: per-image ``labels``, ``flipped``, ``conflict`` and
    ``label_to_identity`` ``(num_classes,)``, ``conflict_identities`` (sorted)."""

    labels: np.ndarray
    flipped: np.ndarray
    conflict: np.ndarray
    label_to_identity: np.ndarray
    conflict_identities: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.label_to_identity)


def apply_label_noise(
    identity: np.ndarray, num_identities: int, cfg: SyntheticConfig, rng: np.random.Generator
) -> LabelNoise:
    """Apply inter-class conflict, then label flips, to images whose true identities are ``identity`` ``(N,)``.

    Returns the noisy labels and the truth (see the module docstring for the exact rules).
    """
    identity = np.asarray(identity, dtype=np.int64)
    labels = identity.copy()
    label_to_identity = list(range(num_identities))
    counts = np.bincount(identity, minlength=num_identities)
    n_conflict = int(round(cfg.conflict_fraction * num_identities))
    eligible = np.flatnonzero(counts >= cfg.conflict_splits)
    if n_conflict > len(eligible):
        raise ValueError(
            f"conflict_fraction={cfg.conflict_fraction} needs {n_conflict} identities with >= "
            f"conflict_splits={cfg.conflict_splits} images, but only {len(eligible)} have that many"
        )
    chosen = (
        np.sort(rng.choice(eligible, size=n_conflict, replace=False)) if n_conflict else np.zeros(0, np.int64)
    )
    conflict = np.isin(identity, chosen)
    for ident in chosen.tolist():
        members = np.flatnonzero(identity == ident)
        parts = np.array_split(rng.permutation(members), cfg.conflict_splits)
        for part in parts[1:]:
            labels[part] = len(label_to_identity)
            label_to_identity.append(ident)
    l2i = np.asarray(label_to_identity, dtype=np.int64)
    flipped = np.zeros(len(identity), dtype=bool)
    n_flip = int(round(cfg.flip_fraction * len(identity)))
    if n_flip:
        which = np.sort(rng.choice(len(identity), size=n_flip, replace=False))
        new = rng.integers(0, len(l2i), size=n_flip)
        bad = l2i[new] == identity[which]
        while bad.any():  # rejection sampling: a label of another identity, uniformly
            new[bad] = rng.integers(0, len(l2i), size=int(bad.sum()))
            bad = l2i[new] == identity[which]
        labels[which] = new
        flipped[which] = True
    return LabelNoise(labels, flipped, conflict, l2i, chosen.astype(np.int64))


def make_pairs(
    pool_identity: np.ndarray, num_pairs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced verification pairs over a pool of images with identities ``pool_identity`` ``(M,)``.

    Returns ``index_a``, ``index_b`` (rows of the pool) and ``issame``, each ``(num_pairs,)``:
    ``num_pairs / 2`` genuine pairs (an identity uniformly, two distinct images of it) and as many
    impostor pairs (two distinct identities uniformly, one image each), in shuffled order.
    """
    if num_pairs % 2:
        raise ValueError(f"num_pairs={num_pairs} must be even (half genuine, half impostor)")
    ids, inverse = np.unique(pool_identity, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(ids))]
    half = num_pairs // 2
    if half and (len(ids) < 2 or min(len(m) for m in members) < 2):
        raise ValueError("pairs need >= 2 identities with >= 2 images each")
    a = np.empty(num_pairs, dtype=np.int64)
    b = np.empty(num_pairs, dtype=np.int64)
    for j in range(half):
        m = members[int(rng.integers(len(ids)))]
        a[j], b[j] = rng.choice(m, size=2, replace=False)
    for j in range(half, num_pairs):
        p, q = rng.choice(len(ids), size=2, replace=False)
        a[j] = members[p][rng.integers(len(members[p]))]
        b[j] = members[q][rng.integers(len(members[q]))]
    issame = np.arange(num_pairs) < half
    order = rng.permutation(num_pairs)
    return a[order], b[order], issame[order]


# --------------------------------------------------------------------------------------------
# Generation and storage


def _streams(cfg: SyntheticConfig) -> dict[str, np.random.SeedSequence]:
    names = ("codes", "sizes", "noise", "train_images", "heldout_images", "pairs")
    root = np.random.SeedSequence([cfg.seed, 0xFACE])
    return {name: _child(root, i) for i, name in enumerate(names)}


def _identity_codes(cfg: SyntheticConfig, seq: np.random.SeedSequence) -> np.ndarray:
    rng = np.random.default_rng(seq)
    total = cfg.num_identities + cfg.heldout_identities
    common = rng.standard_normal(cfg.code_dim)
    own = rng.standard_normal((total, cfg.code_dim))
    rho = cfg.identity_similarity
    return (math.sqrt(rho) * common + math.sqrt(1.0 - rho) * own).astype(np.float32)


@contextlib.contextmanager
def _quiet_progress(datasets: Any) -> Iterator[None]:
    # No "Saving the dataset" bars in DVC logs; the caller's setting is restored.
    tq = datasets.utils
    was_disabled = tq.are_progress_bars_disabled()
    tq.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            tq.enable_progress_bars()


def _save(datasets: Any, columns: dict[str, Any], features: dict[str, Any], path: Path) -> None:
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    ds.save_to_disk(str(path))


def _degradation_counts(truth: dict[str, np.ndarray]) -> dict[str, Any]:
    # meta.json summary of the recorded degradations of one image set.
    n = len(truth["occluded"])
    return {
        "num_blurred": int((truth["blur_sigma"] > 0).sum()),
        "num_pose_extreme": int(truth["pose_extreme"].sum()),
        "mean_blur_sigma": float(truth["blur_sigma"].astype(np.float64).mean()) if n else 0.0,
        "mean_noise_std": float(truth["noise_std"].astype(np.float64).mean()) if n else 0.0,
        "mean_pose_deg": float(truth["pose_deg"].astype(np.float64).mean()) if n else 0.0,
    }


def generate(cfg: SyntheticConfig, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Generate the dataset described by ``cfg`` into ``out_dir`` (see the module docstring).

    The whole folder is built beside ``out_dir`` and renamed into place, so a failed run leaves
    nothing half-written. ``out_dir`` must not exist unless ``overwrite``. Returns ``out_dir``.
    """
    import pfclib
    from pfclib.io import write_json

    if not isinstance(cfg, SyntheticConfig):
        raise TypeError(f"cfg must be a SyntheticConfig, got {type(cfg).__name__}")
    out_dir = as_path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    streams = _streams(cfg)
    renderer = SyntheticRenderer(cfg.code_dim, cfg.renderer_seed)
    codes = _identity_codes(cfg, streams["codes"])
    sizes = class_sizes(cfg, np.random.default_rng(streams["sizes"]))
    identity = np.repeat(np.arange(cfg.num_identities, dtype=np.int64), sizes)
    noise = apply_label_noise(identity, cfg.num_identities, cfg, np.random.default_rng(streams["noise"]))
    train_images, train_truth = render_images_with_truth(
        renderer, codes[identity], cfg, streams["train_images"]
    )

    h_ids = np.repeat(
        np.arange(cfg.num_identities, cfg.num_identities + cfg.heldout_identities, dtype=np.int64),
        cfg.heldout_images_per_identity,
    )
    held_images, held_truth = render_images_with_truth(renderer, codes[h_ids], cfg, streams["heldout_images"])
    ia, ib, issame = make_pairs(h_ids, cfg.num_pairs, np.random.default_rng(streams["pairs"]))

    shape = (3, cfg.image_size, cfg.image_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        with offline() as datasets, _quiet_progress(datasets):
            img = datasets.Array3D(shape, "uint8")
            i64, b, f32 = datasets.Value("int64"), datasets.Value("bool"), datasets.Value("float32")
            # The recorded degradations (TRUTH_COLUMNS; occluded is already among train's columns).
            extra = [name for name in TRUTH_COLUMNS if name != "occluded"]
            truth_features = {name: (b if name == "occluded" else f32) for name in TRUTH_COLUMNS}
            _save(
                datasets,
                {
                    "image": train_images,
                    "label": noise.labels,
                    "identity": identity,
                    "flipped": noise.flipped,
                    "conflict": noise.conflict,
                    "occluded": train_truth["occluded"],
                    **{name: train_truth[name] for name in extra},
                },
                {
                    "image": img,
                    "label": i64,
                    "identity": i64,
                    "flipped": b,
                    "conflict": b,
                    "occluded": b,
                    **{name: f32 for name in extra},
                },
                tmp / "train",
            )
            _save(
                datasets,
                {"image": held_images, "identity": h_ids, **{k: held_truth[k] for k in TRUTH_COLUMNS}},
                {"image": img, "identity": i64, **truth_features},
                tmp / "heldout",
            )
            _save(
                datasets,
                {
                    "image_a": held_images[ia],
                    "image_b": held_images[ib],
                    "issame": issame,
                    "identity_a": h_ids[ia],
                    "identity_b": h_ids[ib],
                    "index_a": ia,
                    "index_b": ib,
                    **{
                        f"{k}_{s}": held_truth[k][idx]
                        for k in TRUTH_COLUMNS
                        for s, idx in (("a", ia), ("b", ib))
                    },
                },
                {
                    "image_a": img,
                    "image_b": img,
                    "issame": b,
                    "identity_a": i64,
                    "identity_b": i64,
                    "index_a": i64,
                    "index_b": i64,
                    **{f"{k}_{s}": truth_features[k] for k in TRUTH_COLUMNS for s in "ab"},
                },
                tmp / "pairs",
            )
        label_sizes = np.bincount(noise.labels, minlength=noise.num_classes)
        meta = {
            "format": FORMAT,
            "pfclib_version": pfclib.__version__,
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "renderer_seed": cfg.renderer_seed,
            "image_shape": list(shape),
            "num_identities": cfg.num_identities,
            "num_classes": noise.num_classes,
            "num_images": int(len(identity)),
            "class_sizes": sizes.tolist(),
            "label_sizes": label_sizes.tolist(),
            "label_to_identity": noise.label_to_identity.tolist(),
            "num_flipped": int(noise.flipped.sum()),
            "conflict_identities": noise.conflict_identities.tolist(),
            "num_conflict_images": int(noise.conflict.sum()),
            "num_occluded": int(train_truth["occluded"].sum()),
            **_degradation_counts(train_truth),
            "heldout": {
                "num_identities": cfg.heldout_identities,
                "images_per_identity": cfg.heldout_images_per_identity,
                "first_identity": cfg.num_identities,
                "num_images": int(len(h_ids)),
                "num_occluded": int(held_truth["occluded"].sum()),
                **_degradation_counts(held_truth),
            },
            "pairs": {
                "num_pairs": cfg.num_pairs,
                "num_genuine": int(issame.sum()),
                "num_impostor": int((~issame).sum()),
            },
        }
        write_json(tmp / "meta.json", meta)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _root(path: Path) -> Path:
    return (
        path.parent
        if path.name in ("train", "heldout", "pairs") and (path.parent / "meta.json").is_file()
        else path
    )


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``meta.json`` of a synthetic dataset (``path``: its root or one of its splits)."""
    import json

    root = _root(as_path(path))
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; {root} is not a synthetic dataset made by generate()")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class SyntheticDataset(HFImageDataset):
    """The ``train`` (or ``heldout``) split of a generated dataset as a pfclib image dataset.

    Item ``i`` is ``(float32 (3, S, S) normalised, label)``. The truth is kept as arrays:
    ``identities``, ``flipped``, ``conflict`` (train only), the per-image degradations ``truth``
    (``{name: (N,)}`` for the :data:`TRUTH_COLUMNS` the split has: datasets written before these
    were recorded have only ``occluded`` in train and nothing in heldout), and ``meta`` (``meta.json``).
    For ``split="heldout"`` the label is the identity id minus ``num_identities`` (0-based).
    """

    def __init__(self, path: str | os.PathLike, image_size: int | None = None, split: str = "train") -> None:
        root = _root(as_path(path))
        self.root = root
        self.meta = load_meta(root)
        self.split = split
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}; expected 'train' or 'heldout'")
        with offline() as datasets:
            ds = datasets.load_from_disk(str(root / split))
        if split == "heldout":
            first = self.meta["heldout"]["first_identity"]
            ds = ds.map(
                lambda batch: {"label": [i - first for i in batch["identity"]]},
                batched=True,
                keep_in_memory=True,
            )
            num_classes = self.meta["heldout"]["num_identities"]
        else:
            num_classes = self.meta["num_classes"]
        super().__init__(ds, "image", "label", num_classes, image_size)
        table = self._arrow[:]
        self.identities = np.asarray(table["identity"], dtype=np.int64)
        if split == "train":
            self.flipped = np.asarray(table["flipped"], dtype=bool)
            self.conflict = np.asarray(table["conflict"], dtype=bool)
        names = set(table.column_names)
        self.truth = {
            name: np.asarray(table[name], dtype=bool if name == "occluded" else np.float32)
            for name in TRUTH_COLUMNS
            if name in names
        }

    def images_uint8(self) -> np.ndarray:
        """All images at their stored size, ``uint8 (N, 3, S, S)`` (one bulk Arrow read)."""
        from pfclib.data.hf import arrow_uint8_rows

        return arrow_uint8_rows(self._arrow[:][self.image_column], self._array_shape).copy()


# --------------------------------------------------------------------------------------------
# CLI


def _section(params: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    node: Any = params
    for part in section.split(".") if section else []:
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"{source}: no section {section!r} (missing {part!r}; available: {have})")
        node = node[part]
    if not isinstance(node, dict):
        raise TypeError(f"{source}: section {section!r} is {type(node).__name__}, expected a mapping")
    return dict(node)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pfclib.data.synthetic --params params.yaml --section data.synthetic --out DIR``."""
    import yaml

    parser = argparse.ArgumentParser(
        prog="python -m pfclib.data.synthetic",
        description="Generate a synthetic identity dataset from a YAML section of SyntheticConfig fields.",
    )
    parser.add_argument("--params", type=Path, help="YAML file (e.g. params.yaml); omit to use defaults")
    parser.add_argument(
        "--section", default="", help="dotted key of the section, e.g. 'data' or 'data.small'"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced if it exists)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field (YAML value), repeatable",
    )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.params is not None:
        with open(args.params) as f:
            values = _section(yaml.safe_load(f) or {}, args.section, str(args.params))
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        values[key.strip()] = yaml.safe_load(raw)
    cfg = SyntheticConfig.from_dict(values)
    out = generate(cfg, args.out, overwrite=True)
    meta = load_meta(out)
    print(
        f"wrote {out}: {meta['num_images']} train images, {meta['num_identities']} identities, "
        f"{meta['num_classes']} labels, {meta['num_flipped']} flipped, "
        f"{len(meta['conflict_identities'])} conflicted identities, {meta['num_blurred']} blurred, "
        f"{meta['num_occluded']} occluded, {meta['pairs']['num_pairs']} pairs",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
