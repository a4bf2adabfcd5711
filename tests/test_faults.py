"""Fault suite: what a user can get wrong, and what a kill can interrupt.

1. ``BAD_INPUTS``, one table of bad inputs across the head, margins, the config, the data readers,
   checkpoints, verification sets, the pairs command and the notebook runner. Each case must raise
   the named exception with a message that names the offending value and what was expected, and
   leave no partial file behind (no ``*.tmp``-like leftover anywhere under its folder, and none of
   the outputs it was asked to write). Cases whose error is still unclear, in files this suite does
   not own, are ``xfail(strict=True)`` with the reason: fixing them turns the case into a failure
   until the mark is removed.
2. SIGKILL: a tiny training run in a subprocess is killed (a real ``SIGKILL`` from this process) at
   four moments (``KILL_MOMENTS``), two of them half-way through a checkpoint write, then resumed with
   ``--resume auto``; its final checkpoint and loss history must equal an uninterrupted run's bitwise.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_train import tiny_config, tiny_data  # noqa: F401 - the module-scoped fixture is used by name

ROOT = Path(__file__).resolve().parents[1]


# =============================================================================== 1. bad inputs
@dataclass(frozen=True)
class Case:
    """One bad input: ``trigger(tmp_path)`` must raise ``error`` with a message matching ``match``."""

    id: str
    area: str
    trigger: Callable[[Path], Any]
    error: type[BaseException]
    match: str  # a regex over the message (plus stderr, where argparse prints its errors)
    outputs: tuple[str, ...] = ()  # paths under tmp_path the failed call was asked to write
    xfail: str | None = None  # why the error is not clear yet, and where to fix it


# ------------------------------------------------------------------- helpers the triggers use
def _head(**kwargs):
    from pfclib.head import PartialFC

    return PartialFC(**{"num_classes": 10, "embedding_size": 8, "sample_rate": 0.5, **kwargs})


def _forward(embeddings, labels, **kwargs):
    return lambda tmp: _head()(embeddings, labels, **kwargs)


def _emb(rows: int = 4, dim: int = 8, nan_row: int | None = None) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    if nan_row is not None:
        x[nan_row, 3] = float("nan")
    return x


def _margin(spec):
    def trigger(tmp):
        from pfclib import margins

        return margins.create(spec)

    return trigger


def _config(data: dict, base: dict | None = None):
    def trigger(tmp):
        from pfclib.config import TrainConfig

        return TrainConfig.from_dict({**({"max_steps": 3} if base is None else base), **data})

    return trigger


def _config_file(name: str):
    def trigger(tmp):
        from pfclib.config import TrainConfig

        return TrainConfig.from_yaml(tmp / name)

    return trigger


def _config_yaml(text: str, section: str | None = None):
    def trigger(tmp):
        from pfclib.config import TrainConfig

        path = tmp / "config.yaml"
        path.write_text(textwrap.dedent(text))
        return TrainConfig.from_yaml(path, section=section)

    return trigger


def _train(config: dict):
    def trigger(tmp):
        from pfclib.train import training_function

        return training_function({"max_steps": 1, "output_dir": str(tmp / "run"), **config})

    return trigger


def _png(path: Path, value: int = 0, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _faces(root: Path, identities: int, images: int = 2) -> Path:
    for i in range(identities):
        for j in range(images):
            _png(root / f"id{i:02d}" / f"{j}.png", value=10 * i + j)
    return root


def _dataset(kind: str, rel: str, prepare: Callable[[Path], Any] | None = None, read: Any = None, **kw):
    """Open a data set at ``tmp/rel`` (after ``prepare(path)``); ``read``: an item index to read, or
    ``"labels"`` for every label (what the trainer and the pairs command read)."""

    def trigger(tmp):
        from pfclib.data import build_dataset

        path = tmp / rel
        if prepare is not None:
            prepare(path)
        if kind == "imagefolder_hf":
            kw.setdefault("cache_dir", tmp / "hf_cache")
        ds = build_dataset(kind, path, **kw)
        return ds.labels if read == "labels" else ds if read is None else ds[read]

    return trigger


def _recordio(path: Path) -> Path:
    from pfclib.data.recordio import write_recordio

    images = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    return write_recordio(path, images, [0, 0, 1, 1])


def _broken_recordio(edit: Callable[[Path], Any]):
    def prepare(path):
        _recordio(path)
        edit(path)

    return prepare


def _flat_recordio(path: Path, num_classes: int) -> None:
    """Rewrite ``path`` in the flat layout (no header record), then claim ``num_classes`` classes."""
    import shutil

    from pfclib.data.recordio import write_recordio

    shutil.rmtree(path)
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    write_recordio(path, images, [0, 0, 1, 1], header=False)
    (path / "property").write_text(f"{num_classes},8,8\n")


def _append_index_line(path: Path) -> None:
    with (path / "train.idx").open("a") as f:
        f.write("99\t999999\n")


def _zero_magic(path: Path) -> None:
    rec = path / "train.rec"
    rec.write_bytes(b"\0\0\0\0" + rec.read_bytes()[4:])


def _write_recordio(labels, bad_label: int | None = None, num_classes: int | None = None):
    def trigger(tmp):
        from pfclib.data.recordio import RecordIOWriter, write_recordio

        images = np.zeros((4, 3, 8, 8), np.uint8)
        if bad_label is None:
            return write_recordio(tmp / "rec", images, labels, num_classes=num_classes)
        with RecordIOWriter(tmp / "rec") as writer:
            writer.write(images[0], 0)
            writer.write(images[1], bad_label)  # fails half-way through the dataset

    return trigger


def _flat_image_folder(path: Path) -> None:
    _png(path / "a.png", 1)
    _png(path / "b.png", 2)


def _folder_with_bad_image(path: Path) -> None:
    _png(path / "bob" / "0.png")
    (path / "alice").mkdir(parents=True)
    (path / "alice" / "0.jpg").write_bytes(b"not an image")


def _checkpoint_file(content: bytes | Callable[[], Any]):
    def trigger(tmp):
        from pfclib.checkpoint import load_checkpoint

        path = tmp / "ckpt_00000001.pt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content(), path)
        return load_checkpoint(path)

    return trigger


def _real_checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"format": "pfclib-checkpoint/1", "weights": torch.zeros(64, 64)}, buf)
    return buf.getvalue()


def _minimal_checkpoint(**extra) -> dict:
    state = {"format": "pfclib-checkpoint/1", "config": {}, "step": 1, "backbone": {}, "head": {}}
    return {**state, **extra}


def _save_checkpoint(state: dict):
    def trigger(tmp):
        from pfclib.checkpoint import save_checkpoint

        return save_checkpoint(state, tmp / "checkpoints" / "ckpt_00000001.pt")

    return trigger


def _resolve_resume(name: str):
    def trigger(tmp):
        from pfclib.checkpoint import resolve_resume

        return resolve_resume(tmp / name, tmp)

    return trigger


def _load_backbone(config: dict, backbone: dict):
    def trigger(tmp):
        from pfclib.checkpoint import load_backbone

        torch.save(_minimal_checkpoint(config=config, backbone=backbone), tmp / "ckpt.pt")
        return load_backbone(tmp / "ckpt.pt")

    return trigger


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _bin(obj_or_bytes, check_nfolds: int | None = None):
    def trigger(tmp):
        from pfclib.data import load_verification

        path = tmp / "pairs.bin"
        raw = obj_or_bytes if isinstance(obj_or_bytes, bytes) else pickle.dumps(obj_or_bytes)
        path.write_bytes(raw)
        vset = load_verification(path)
        if check_nfolds is not None:
            vset.check_usable(check_nfolds)
        return vset

    return trigger


def _load_verification(name: str):
    def trigger(tmp):
        from pfclib.data import load_verification

        return load_verification(tmp / name)

    return trigger


def _encoded(size: int = 8) -> bytes:
    from pfclib.data.recordio import encode_image

    return encode_image(np.zeros((3, size, size), np.uint8), format="PNG")


def _written_bin(issame: list[bool], check_nfolds: int):
    def trigger(tmp):
        from pfclib.data import load_verification
        from pfclib.data.verification import write_bin

        images = torch.randint(0, 256, (2 * len(issame), 3, 8, 8), dtype=torch.uint8)
        path = write_bin(tmp / "one_sided.bin", images, issame, image_format="PNG")
        load_verification(path).check_usable(check_nfolds)

    return trigger


def _write_bin(images, issame):
    def trigger(tmp):
        from pfclib.data.verification import write_bin

        return write_bin(tmp / "out.bin", images, issame, image_format="PNG")

    return trigger


def _pairs_cli(*args: str, identities: int = 5, out: str = "pairs.bin", make_out_dir: bool = False):
    def trigger(tmp):
        from pfclib.data import pairs

        faces = _faces(tmp / "faces", identities)
        if make_out_dir:
            (tmp / out).mkdir()
        return pairs.main(["--data", str(faces), "--out", str(tmp / out), "--image-size", "8", *args])

    return trigger


NOTEBOOK_PARAMETERS = (
    'repeats = 2  # an int\nlr = 0.1\nfar = "1e-3"\nout_dir = "scratch/x"\nprofile = "tiny"\n'
)


def _notebook(tmp: Path) -> Path:
    cell = {
        "cell_type": "code",
        "execution_count": None,
        "metadata": {"tags": ["parameters"]},
        "outputs": [],
        "source": NOTEBOOK_PARAMETERS,
    }
    nb = {
        "cells": [cell],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp / "study.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _nbrun(cpu_params: dict | str, section: str = "study", profile: str = "cpu", notebook: str | None = None):
    def trigger(tmp):
        from pfcrepro.nbrun import run_notebook

        params = tmp / "params.yaml"
        block = cpu_params if isinstance(cpu_params, str) else yaml.safe_dump({"cpu": cpu_params, "gpu": {}})
        params.write_text(f"profile: cpu\nstudy:\n{textwrap.indent(block, '  ')}")
        nb = tmp / notebook if notebook else _notebook(tmp)
        return run_notebook(nb, section, tmp / "out", params_file=params, profile=profile)

    return trigger


def _nbrun_cli(*args: str):
    def trigger(tmp):
        from pfcrepro import nbrun

        return nbrun.main([str(_notebook(tmp)), "--section", "study", "--out-dir", str(tmp / "out"), *args])

    return trigger


# ------------------------------------------------------------------------------------ the table
# Bad inputs by area (test_the_table_counts_every_area keeps these numbers true):
#   head          PartialFC construction, forward, optimizer, state dicts     20
#   margins       pfclib.margins.create                                      11
#   config        TrainConfig from dicts and YAML files, the trainer's checks 21
#   data          build_dataset: folder, recordio, hf, imagefolder_hf         22
#   checkpoints   load / save / load_backbone / resume                       10
#   verification  .bin files, write_bin, check_usable                         12
#   pairs         python -m pfclib.data.pairs                                  5
#   nbrun         pfcrepro.nbrun: run_notebook and its command line            7
#   total                                                                    108
AREA_COUNTS = {
    "head": 20,
    "margins": 11,
    "config": 21,
    "data": 22,
    "checkpoints": 10,
    "verification": 12,
    "pairs": 5,
    "nbrun": 7,
}

_NAN = float("nan")
_LABELS4 = torch.tensor([0, 1, 2, 3])

BAD_INPUTS: list[Case] = [
    # ---- head: PartialFC
    Case("head-sample-rate-zero", "head", lambda t: _head(sample_rate=0.0), ValueError,
         r"sample_rate must be in \(0, 1\], got 0\.0"),
    Case("head-sample-rate-above-one", "head", lambda t: _head(sample_rate=1.5), ValueError,
         r"sample_rate must be in \(0, 1\], got 1\.5"),
    Case("head-sample-rate-nan", "head", lambda t: _head(sample_rate=_NAN), ValueError,
         r"sample_rate must be in \(0, 1\], got nan"),
    Case("head-sample-rate-text", "head", lambda t: _head(sample_rate="0.1"), TypeError,
         r"sample_rate must be a number in \(0, 1\], got str: '0\.1'"),
    Case("head-num-classes-none", "head", lambda t: _head(num_classes=None), ValueError,
         r"num_classes must be a positive integer, got None"),
    Case("head-embedding-size-fraction", "head", lambda t: _head(embedding_size=7.5), ValueError,
         r"embedding_size must be a positive integer, got 7\.5"),
    Case("head-update-unknown", "head", lambda t: _head(update="lazy"), ValueError,
         r"update must be 'dense' or 'sparse', got 'lazy'"),
    Case("head-dtype-half", "head", lambda t: _head(dtype=torch.float16), ValueError,
         r"dtype of the centers must be torch\.float32 or torch\.float64, got torch\.float16"),
    Case("head-wrong-embedding-dim", "head", _forward(_emb(dim=16), _LABELS4), ValueError,
         r"embeddings must have shape \(B, 8\), got \(4, 16\)"),
    Case("head-labels-out-of-range", "head", _forward(_emb(), torch.tensor([0, 12, 3, -1])), ValueError,
         r"labels must lie in \[0, 10\), got out-of-range values \[-1, 12\]"),
    Case("head-labels-float", "head", _forward(_emb(), _LABELS4.float()), TypeError,
         r"labels must be an integer tensor, got dtype torch\.float32"),
    Case("head-labels-length", "head", _forward(_emb(), _LABELS4[:3]), ValueError,
         r"labels must have shape \(4,\) to match the embeddings, got \(3,\)"),
    Case("head-nan-embeddings", "head", _forward(_emb(nan_row=2), _LABELS4), ValueError,
         r"embeddings contain non-finite values \(NaN/inf\) in rows \[2\]"),
    Case("head-index-misses-a-positive", "head",
         _forward(_emb(), _LABELS4, index=torch.tensor([0, 1, 3])), ValueError,
         r"local positive classes \[2\] are missing from the sampled index set"),
    Case("head-optimizer-lr-text", "head", lambda t: _head().make_optimizer("sgd", lr="0.1"), TypeError,
         r"lr must be a real number, got str: '0\.1'"),
    Case("head-state-of-another-head", "head",
         lambda t: _head().load_full_state_dict(_head(num_classes=12).full_state_dict()), ValueError,
         r"full state dict is for C=12, D=8; this head has C=10, D=8"),
    Case("head-sub-centers-zero", "head", lambda t: _head(sub_centers=0), ValueError,
         r"sub_centers must be a positive integer, got 0"),
    Case("head-dim-sample-rate-above-one", "head", lambda t: _head(dim_sample_rate=1.5), ValueError,
         r"dim_sample_rate must be a number in \(0, 1\], got 1\.5"),
    Case("head-dim-sample-rate-keeps-nothing", "head", lambda t: _head(dim_sample_rate=0.1), ValueError,
         r"dim_sample_rate=0\.1 keeps int\(0\.1 \* 8\) = 0 of the 8 embedding dimensions; it must keep at least one"),
    Case("head-dims-out-of-range", "head",
         lambda t: _head(dim_sample_rate=0.5)(_emb(), _LABELS4, dims=torch.tensor([0, 1, 3, 9])), ValueError,
         r"dims must lie in \[0, 8\), got \[0, 9\]"),
    # ---- margins.create
    Case("margin-unknown-name", "margins", _margin("arcfase"), ValueError,
         r"unknown margin 'arcfase'; expected one of \['adaface', 'arcface', 'arcface_st', 'combined'"),
    Case("margin-unknown-parameter", "margins", _margin({"name": "arcface", "mm": 0.5}), ValueError,
         r"unknown parameter\(s\) \['mm'\] for margin 'arcface'; accepted: \[.*'m'"),
    Case("margin-dict-without-name", "margins", _margin({"m": 0.5}), ValueError,
         r"margin dict needs a 'name' key \(one of \[.*\]\), got keys \['m'\]"),
    Case("margin-spec-wrong-type", "margins", _margin(42), TypeError,
         r"margin must be a Margin, a name or a dict, got int: 42"),
    Case("margin-arcface-m-too-large", "margins", _margin({"name": "arcface", "m": 4.0}), ValueError,
         r"ArcFace margin m must be in \[0, pi\), got 4\.0"),
    Case("margin-scale-negative", "margins", _margin({"name": "cosface", "s": -1.0}), ValueError,
         r"scale s must be a finite positive number, got -1\.0"),
    Case("margin-filter-out-of-range", "margins", _margin({"name": "arcface", "filter_threshold": 2}),
         ValueError, r"filter_threshold must be in \(-1, 1\] or None, got 2"),
    Case("margin-m-text", "margins", _margin({"name": "arcface", "m": "0.5"}), TypeError,
         r"margin 'arcface': m must be a real number, got str: '0\.5'"),
    Case("margin-straight-through-text", "margins",
         _margin({"name": "arcface", "straight_through": "yes"}), TypeError,
         r"straight_through must be a bool \(true or false\), got str: 'yes'"),
    Case("margin-adaface-negative-h", "margins", _margin({"name": "adaface", "h": -1.0}), ValueError,
         r"margin 'adaface': h must be in \(0\.0, inf\), got -1\.0"),
    Case("margin-npcface-margin-can-go-negative", "margins", _margin({"name": "npcface", "m0": 0.1, "m1": 0.2}),
         ValueError, r"margin 'npcface': m_i = m0 \+ m1·\(mean hard cosine in \[-1, 1\]\) must stay in \[0, pi\), "
         r"got m0=0\.1, m1=0\.2"),
    # ---- config: TrainConfig
    Case("config-unknown-key", "config", _config({"optim": {"lrr": 0.1}}), ValueError,
         r"unknown key\(s\) \['optim\.lrr'\] in optim; valid keys: \[.*'lr'"),
    Case("config-wrong-type", "config", _config({"data": {"batch_size": "32"}}), TypeError,
         r"data\.batch_size must be int, got str: '32'"),
    Case("config-bool-for-a-number", "config", _config({"data": {"batch_size": True}}), TypeError,
         r"data\.batch_size must be int, got bool: True"),
    Case("config-yaml-exponent-without-dot", "config", _config_yaml("max_steps: 3\noptim: {lr: 1e-3}\n"),
         TypeError, r"optim\.lr must be float, got str: '1e-3' \(YAML reads 1e-3 as text; write it with a dot"),
    Case("config-yaml-unquoted-off", "config", _config_yaml("max_steps: 3\nlog: {progress: off}\n"),
         TypeError, r"log\.progress must be str, got bool: False \(YAML reads unquoted off/on/yes/no"),
    Case("config-sample-rate-zero", "config", _config({"head": {"sample_rate": 0}}), ValueError,
         r"head\.sample_rate must be in \(0, 1\], got 0"),
    Case("config-lr-infinite", "config", _config({"optim": {"lr": math.inf}}), ValueError,
         r"optim\.lr must be a finite number > 0, got inf"),
    Case("config-max-steps-zero", "config", _config({"max_steps": 0}), ValueError,
         r"max_steps must be >= 1, got 0"),
    Case("config-no-length", "config", _config({}, base={}), ValueError,
         r"one of max_steps or num_epochs must be set, got both None"),
    Case("config-mixed-precision-unknown", "config", _config({"mixed_precision": "fp8"}), ValueError,
         r"mixed_precision must be one of \['no', 'fp16', 'bf16'\], got 'fp8'"),
    Case("config-section-not-a-mapping", "config", _config({"optim": 0.1}), TypeError,
         r"optim must be a mapping, got float: 0\.1"),
    Case("config-file-missing", "config", _config_file("nothing.yaml"), FileNotFoundError,
         r"config file '.*nothing\.yaml' does not exist"),
    Case("config-section-missing", "config", _config_yaml("max_steps: 3\n", section="train"), KeyError,
         r"section 'train' not found in '.*config\.yaml' \(missing 'train'; keys: \['max_steps'\]\)"),
    Case("config-file-is-a-list", "config", _config_yaml("- max_steps\n- 3\n"), TypeError,
         r"config in '.*config\.yaml' \(section None\) must be a mapping, got list"),
    Case("config-yaml-syntax-error", "config", _config_yaml("max_steps: [3\n"), Exception,
         r"config\.yaml.*line \d+"),
    Case("config-fp16-on-cpu", "config", _train({"device": "cpu", "mixed_precision": "fp16"}), ValueError,
         r"mixed_precision='fp16' needs a CUDA device .* set mixed_precision to 'bf16' or 'no'", outputs=("run",)),
    Case("config-margin-name-unchecked", "config", _config({"head": {"margin": {"name": "arcfce"}}}),
         ValueError, r"head.margin: .*unknown margin 'arcfce'"),
    Case("config-sub-centers-text", "config", _config({"head": {"sub_centers": "3"}}), TypeError,
         r"head\.sub_centers must be int, got str: '3'"),
    Case("config-dim-sample-rate-zero", "config", _config({"head": {"dim_sample_rate": 0}}), ValueError,
         r"head\.dim_sample_rate must be a number in \(0, 1\], got 0"),
    Case("config-quality-weight-zero", "config", _config({"quality": {"enabled": True, "weight": 0}}),
         ValueError, r"quality\.weight must be a finite number > 0 \(lambda of the quality loss\), got 0"),
    Case("config-quality-eps-too-large", "config", _config({"quality": {"eps": 1.5}}), ValueError,
         r"quality\.eps must be in \[0, 1\) \(it keeps NNCCS \+ 1 \+ eps above 0\), got 1\.5"),
    # ---- data readers: build_dataset
    Case("data-kind-unknown", "data", _dataset("tfrecord", "x"), ValueError,
         r"unknown dataset kind 'tfrecord'; expected one of \['synthetic', 'recordio', 'folder'"),
    Case("data-image-size-zero", "data", _dataset("folder", "faces", lambda p: _faces(p, 1), image_size=0),
         ValueError, r"image_size must be a positive int or None, got 0"),
    Case("folder-missing", "data", _dataset("folder", "nowhere"), FileNotFoundError,
         r"nowhere: no such folder; expected root/<identity>/<image files>"),
    Case("folder-empty", "data", _dataset("folder", "empty", lambda p: p.mkdir()), FileNotFoundError,
         r"empty: no identity sub-folders; expected root/<identity>/<image files>"),
    Case("folder-identity-without-images", "data",
         _dataset("folder", "faces", lambda p: (_faces(p, 1), (p / "bob").mkdir(), (p / "bob/a.txt").touch())),
         FileNotFoundError, r"1 identity folder\(s\) hold no image with extension in \['\.jpg'.*: bob"),
    Case("folder-undecodable-image", "data", _dataset("folder", "faces", _folder_with_bad_image, read=0),
         ValueError, r"alice/0\.jpg: cannot decode 12 bytes as an image \(first bytes 0x6e6f7420"),
    Case("recordio-index-missing", "data",
         _dataset("recordio", "rec", _broken_recordio(lambda p: (p / "train.idx").unlink())),
         FileNotFoundError, r"train\.idx: missing; a RecordIO dataset needs train\.rec and train\.idx"),
    Case("recordio-property-two-fields", "data",
         _dataset("recordio", "rec", _broken_recordio(lambda p: (p / "property").write_text("2,8\n"))),
         ValueError, r"property: content '2,8'; expected 'num_classes,height,width' with three positive"),
    Case("recordio-property-binary", "data",
         _dataset("recordio", "rec", _broken_recordio(lambda p: (p / "property").write_bytes(b"\x89PNG\xff\x00"))),
         ValueError, r"property: binary content; expected one text line 'num_classes,height,width'"),
    Case("recordio-property-fewer-classes-than-identities", "data",
         _dataset("recordio", "rec", _broken_recordio(lambda p: (p / "property").write_text("1,8,8\n"))),
         ValueError, r"property: num_classes=1, but header record 0 of .*train.rec lists 2 identity records "
         r"\(one per class\); expected num_classes >= 2"),
    Case("recordio-flat-label-outside-property", "data",
         _dataset("recordio", "rec", _broken_recordio(lambda p: _flat_recordio(p, num_classes=1))),
         ValueError, r"record key 2 has label 1, outside \[0, 1\) from property"),
    Case("recordio-index-past-the-end", "data", _dataset("recordio", "rec", _broken_recordio(_append_index_line)),
         ValueError, r"train\.idx: line \d+: key 99 at byte offset 999999, but the \.rec file has only \d+ bytes"),
    Case("recordio-bad-magic", "data", _dataset("recordio", "rec", _broken_recordio(_zero_magic)),
         ValueError, r"record key 0 at byte offset 0: magic 0x00000000, expected 0xced7230a"),
    Case("recordio-writer-negative-label", "data", _write_recordio(None, bad_label=-1), ValueError,
         r"labels must be >= 0, got -1", outputs=("rec/train.rec", "rec/train.idx", "rec/property")),
    Case("recordio-writer-fewer-labels", "data", _write_recordio([0, 1]), ValueError,
         r"write_recordio: only 2 labels for more than 2 images; expected one label per image",
         outputs=("rec/train.rec", "rec/train.idx", "rec/property")),
    Case("recordio-writer-more-labels", "data", _write_recordio([0, 1, 2, 3, 4]), ValueError,
         r"write_recordio: more labels than the 4 images; expected one label per image",
         outputs=("rec/train.rec", "rec/train.idx", "rec/property")),
    Case("recordio-writer-num-classes-too-small", "data", _write_recordio([0, 1, 2, 3], num_classes=2),
         ValueError, r"num_classes=2 but a label 3 was written",
         outputs=("rec/train.rec", "rec/train.idx", "rec/property")),
    Case("hf-not-a-saved-dataset", "data", _dataset("hf", "empty", lambda p: p.mkdir()), FileNotFoundError,
         r"empty: not a saved datasets folder"),
    Case("imagefolder-hf-empty", "data", _dataset("imagefolder_hf", "empty", lambda p: p.mkdir()),
         FileNotFoundError, r"empty: datasets' imagefolder found no image files .*expected root/<identity>/<image"),
    Case("imagefolder-hf-empty-identity", "data",
         _dataset("imagefolder_hf", "faces", lambda p: (_faces(p, 2), (p / "id99").mkdir())),
         FileNotFoundError, r"1 identity folder\(s\) hold no image .*: id99; .*ids shifted"),
    Case("imagefolder-hf-no-class-folders", "data", _dataset("imagefolder_hf", "flat", _flat_image_folder),
         ValueError, r"flat: datasets' imagefolder found no class folders \(columns \['image'\]\); expected one"),
    Case("imagefolder-hf-undecodable-image", "data",
         _dataset("imagefolder_hf", "faces", _folder_with_bad_image, read=0), ValueError,
         r"row 0 of column 'image': cannot decode the image .*alice/0\.jpg.*expected a file Pillow can read"),
    # ---- checkpoints
    Case("checkpoint-garbage", "checkpoints", _checkpoint_file(b"this is not a checkpoint"), ValueError,
         r"checkpoint '.*ckpt_00000001\.pt' is corrupt: 24 bytes without the zip header torch\.save writes"),
    Case("checkpoint-empty", "checkpoints", _checkpoint_file(b""), ValueError,
         r"checkpoint '.*ckpt_00000001\.pt' is truncated \(empty: 0 bytes"),
    Case("checkpoint-truncated", "checkpoints", _checkpoint_file(_real_checkpoint_bytes()[:9000]), ValueError,
         r"checkpoint '.*ckpt_00000001\.pt' is truncated or corrupt"),
    Case("checkpoint-missing-keys", "checkpoints",
         _checkpoint_file(lambda: {"format": "pfclib-checkpoint/1", "step": 1}), ValueError,
         r"checkpoint '.*' is missing key\(s\) \['config', 'backbone', 'head'\]"),
    Case("checkpoint-not-a-dict", "checkpoints", _checkpoint_file(lambda: [1, 2]), ValueError,
         r"is not a pfclib checkpoint: expected format 'pfclib-checkpoint/1', got 'list'"),
    Case("checkpoint-save-missing-keys", "checkpoints", _save_checkpoint({"format": "pfclib-checkpoint/1"}),
         ValueError, r"checkpoint is missing key\(s\) \['config', 'step', 'backbone', 'head'\]; required",
         outputs=("checkpoints/ckpt_00000001.pt",)),
    Case("checkpoint-save-unpicklable", "checkpoints", _save_checkpoint(_minimal_checkpoint(head={"f": lambda: 0})),
         Exception, r"[Cc]an't pickle .*lambda", outputs=("checkpoints/ckpt_00000001.pt",)),
    Case("checkpoint-resume-path-missing", "checkpoints", _resolve_resume("gone.pt"), FileNotFoundError, r"resume checkpoint '.*gone\.pt' does not exist"),
    Case("checkpoint-config-lacks-image-size", "checkpoints",
         _load_backbone({"backbone": "iresnet_tiny", "embedding_size": 32}, {}), ValueError,
         r"its config lacks 'image_size' \(keys: \['backbone', 'embedding_size'\]\)"),
    Case("checkpoint-backbone-weights-mismatch", "checkpoints",
         _load_backbone({"backbone": "iresnet_tiny", "embedding_size": 32, "image_size": 32},
                        {"conv.weight": torch.zeros(1)}),
         RuntimeError, r"Missing key\(s\) in state_dict: \"conv1\.weight\".*Unexpected key\(s\) in state_dict: "
         r"\"conv\.weight\""),
    # ---- verification sets
    Case("bin-not-a-pickle", "verification", _bin(b"garbage\x00\x01"), ValueError,
         r"pairs\.bin: not a readable pickle \(UnpicklingError"),
    Case("bin-wrong-structure", "verification", _bin({"images": []}), ValueError,
         r"pairs\.bin: the pickle holds dict; expected a pair \(list of encoded images, list of bool\)"),
    Case("bin-odd-image-count", "verification", _bin(([b"x"] * 3, [True])), ValueError,
         r"pairs\.bin: 3 images is odd; expected two images per pair"),
    Case("bin-flag-not-bool", "verification", _bin(([b"x", b"y"], ["yes"])), ValueError,
         r"pairs\.bin: issame\[0\] is 'yes'; expected a bool"),
    Case("bin-undecodable-image", "verification", _bin(([b"xy", b"z"], [True])), ValueError,
         r"pairs\.bin: image 0: cannot decode 2 bytes as an image"),
    Case("bin-mixed-image-sizes", "verification", _bin(([_encoded(8), _encoded(9)], [True])), ValueError,
         r"image 1 has shape \(3, 9, 9\), image 0 has \(3, 8, 8\); pass image_size to resize"),
    Case("bin-runs-code", "verification", _bin(([_RunsCode(), b"x"], [True])), ValueError,
         r"the pickle asks for global posix\.system, which a verification \.bin file never needs"),
    Case("verification-one-sided", "verification", _written_bin([True] * 10, 5), ValueError,
         r"'one_sided': all 10 pairs are genuine; verification needs both genuine and impostor pairs"),
    Case("verification-fewer-pairs-than-folds", "verification", _written_bin([True, False] * 2, 10),
         ValueError, r"'one_sided': 4 pairs cannot be split into 10 folds"),
    Case("verification-path-missing", "verification", _load_verification("lfw.bin"), FileNotFoundError,
         r"lfw\.bin: no such file or folder; expected a \.bin file or a synthetic pairs folder"),
    Case("verification-write-flag-count", "verification",
         _write_bin(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), [True] * 3), ValueError,
         r"out\.bin: 3 issame flags for 8 images; expected 4 \(images / 2\)", outputs=("out.bin",)),
    Case("verification-write-float-images", "verification", _write_bin(torch.rand(4, 3, 8, 8), [True, False]),
         ValueError, r"out\.bin: image 0: expected uint8 pixel values in \[0, 255\], got dtype float32",
         outputs=("out.bin",)),
    # ---- pairs: python -m pfclib.data.pairs
    Case("pairs-too-few-identities", "pairs", _pairs_cli("--pairs", "40"), ValueError,
         r"10-fold verification needs at least 20 identities with 2 or more images .* has 5 of 5",
         outputs=("pairs.bin", "pairs.json")),
    Case("pairs-too-few-pairs", "pairs", _pairs_cli("--pairs", "5"), ValueError,
         r"5 pairs cannot give each of 10 folds a genuine and an impostor pair: ask for at least 20",
         outputs=("pairs.bin", "pairs.json")),
    Case("pairs-holdout-out-of-range", "pairs", _pairs_cli("--pairs", "40", "--holdout", "1.5"), ValueError,
         r"holdout must be a fraction in \(0, 1\), got 1\.5", outputs=("pairs.bin", "pairs.json")),
    Case("pairs-out-not-a-bin-file", "pairs", _pairs_cli(out="pairs.txt"), SystemExit,
         r"--out must name a \.bin file, got '.*pairs\.txt'", outputs=("pairs.txt", "pairs.json")),
    Case("pairs-out-is-a-folder", "pairs", _pairs_cli(make_out_dir=True), SystemExit,
         r"--out '.*pairs\.bin' is a folder; expected the path of a \.bin file", outputs=("pairs.json",)),
    # ---- notebook runner: pfcrepro.nbrun
    Case("nbrun-misspelt-parameter", "nbrun", _nbrun({"repeatz": 3}), ValueError,
         r"unknown parameter\(s\) \['repeatz'\] for study\.ipynb \(did you mean: 'repeatz' -> 'repeats'\?\); "
         r"its parameters cell declares \['far', 'lr', 'out_dir', 'profile', 'repeats'\]", outputs=("out",)),
    Case("nbrun-wrong-type", "nbrun", _nbrun({"repeats": "two"}), TypeError,
         r"parameter 'repeats' of study\.ipynb must be int like its default 2, got str: 'two'", outputs=("out",)),
    Case("nbrun-yaml-exponent-without-dot", "nbrun", _nbrun("cpu: {lr: 1e-3}\ngpu: {}\n"), TypeError,
         r"parameter 'lr' of study\.ipynb must be float like its default 0\.1, got str: '1e-3' \(YAML reads "
         r"1e-3 as text", outputs=("out",)),
    Case("nbrun-section-missing", "nbrun", _nbrun({}, section="stduy"), KeyError,
         r"section 'stduy' not found in .*params\.yaml; sections: \['study'\]", outputs=("out",)),
    Case("nbrun-profile-unknown", "nbrun", _nbrun({}, profile="tpu"), ValueError,
         r"profile must be one of \('cpu', 'gpu'\), got 'tpu'", outputs=("out",)),
    Case("nbrun-notebook-missing", "nbrun", _nbrun({}, notebook="nothing.ipynb"), FileNotFoundError,
         r"notebook '.*nothing\.ipynb' does not exist", outputs=("out",)),
    Case("nbrun-cli-profile-unknown", "nbrun", _nbrun_cli("--profile", "tpu"), SystemExit,
         r"argument --profile: invalid choice: 'tpu' \(choose from '?cpu'?, '?gpu'?\)", outputs=("out",)),
]  # fmt: skip


_PARTIAL = re.compile(r"(\.tmp|\.partial|\.incomplete|\.running\.ipynb)$")


def _partial_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if _PARTIAL.search(p.name))


def _params() -> list:
    return [
        pytest.param(
            case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        )
        for case in BAD_INPUTS
    ]


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_refused_clearly_and_leaves_no_partial_file(case: Case, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(case.error) as info:
        case.trigger(work)
    message = f"{info.value}\n{capsys.readouterr().err}"  # argparse (SystemExit) prints to stderr
    assert re.search(case.match, message, re.S), f"{case.id}: {type(info.value).__name__}: {message}"
    assert _partial_files(work) == [], case.id
    left = [rel for rel in case.outputs if (work / rel).exists()]
    assert left == [], f"{case.id}: the failed call left {left}"


def test_the_table_counts_every_area():
    counts = Counter(case.area for case in BAD_INPUTS)
    assert dict(counts) == AREA_COUNTS, "update AREA_COUNTS and the comment block above the table"
    assert sum(counts.values()) >= 30 and len({c.id for c in BAD_INPUTS}) == len(BAD_INPUTS)


# ================================================================================== 2. SIGKILL
# A wrapper around `python -m pfclib.train` that stops at one moment and waits there for the test
# to kill it: inside the head's forward of step N ("step:N"), half-way through writing the head
# shard of step N ("shard:N"), or half-way through writing the checkpoint file of step N, after its
# shards ("write:N"); half of torch.save's bytes are in the temporary file, fsynced.
WRAPPER = """
import io, os, sys, time

import torch

import pfclib.train
from pfclib.head import PartialFC

moment, marker, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
kind, n = moment.split(":")
n = int(n)


def wait_for_the_kill():
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(1)


if kind == "step":
    forward, calls = PartialFC.forward, [0]

    def patched_forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            wait_for_the_kill()
        return forward(self, *args, **kwargs)

    PartialFC.forward = patched_forward
else:
    save = torch.save
    # the temporary of checkpoint n's file, or of its head shard (in ckpt_<n>.head-<token>/)
    target = f".ckpt_{n:08d}.pt." if kind == "write" else f"ckpt_{n:08d}.head-"

    def patched_save(obj, f, *args, **kwargs):
        if target in os.fspath(f) and os.fspath(f).endswith(".tmp"):
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            wait_for_the_kill()
        return save(obj, f, *args, **kwargs)

    torch.save = patched_save
pfclib.train.main(argv)
"""

STEPS, EVERY = 12, 3
# moment -> (what it interrupts, the step a --resume auto run starts from)
KILL_MOMENTS = {
    "step:2": ("step 2, before any checkpoint exists", 0),
    "step:8": ("step 8, between the checkpoints of steps 6 and 9", 6),
    "write:6": ("the write of the step-6 checkpoint, half of it on disk", 3),
    "write:12": ("the write of the final checkpoint, after the last step", 9),
    "shard:9": ("the write of the step-9 head shard, before the checkpoint file", 6),
}


def _train_config(data: Path, out: Path) -> dict:
    """test_train's tiny run, without evaluation, a checkpoint every EVERY steps, all kept (the
    resumed-from file is read below), a log row every step."""
    return tiny_config(
        data,
        out,
        **{"max_steps": STEPS, "data.batch_size": 16, "eval.verification": [], "log.every": 1,
           "checkpoint.every": EVERY, "checkpoint.keep": 10},
    )  # fmt: skip


@dataclass
class Interrupted:
    run: Path
    after_kill: list[str]  # the files of the checkpoints folder right after the kill
    partial_sizes: list[int]  # sizes of temporaries left there (or in a head folder) by the killed write


class KillLab:
    """Runs the reference and the killed-then-resumed trainings, each once per module."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data = root, data
        self.wrapper = root / "killable_train.py"
        self.wrapper.write_text(WRAPPER)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self._reference: Path | None = None
        self._interrupted: dict[str, Interrupted] = {}

    def _config(self, name: str) -> tuple[Path, Path]:
        run = self.root / name
        cfg = self.root / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(_train_config(self.data, run)))
        return run, cfg

    def _train(self, cfg: Path, *extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "pfclib.train", "--config", str(cfg), *extra],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    def reference(self) -> Path:
        if self._reference is None:
            run, cfg = self._config("reference")
            self._train(cfg)
            self._reference = run
        return self._reference

    def interrupted(self, moment: str) -> Interrupted:
        if moment not in self._interrupted:
            name = moment.replace(":", "_")
            run, cfg = self._config(name)
            marker, log = self.root / f"{name}.paused", self.root / f"{name}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(
                    [sys.executable, str(self.wrapper), moment, str(marker), "--config", str(cfg)],
                    cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
                deadline = time.monotonic() + 240
                while not marker.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        pytest.fail(f"{moment}: the run never reached its moment:\n{log.read_text()[-3000:]}")
                    time.sleep(0.01)
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL
            folder = run / "checkpoints"
            names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
            partial = [p.stat().st_size for p in sorted(folder.rglob("*.tmp"))] if folder.is_dir() else []
            self._interrupted[moment] = Interrupted(run, names, partial)
            self._train(cfg, "--resume", "auto")
        return self._interrupted[moment]


@pytest.fixture(scope="module")
def kill_lab(tmp_path_factory, tiny_data) -> KillLab:  # noqa: F811
    return KillLab(tmp_path_factory.mktemp("sigkill"), tiny_data)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list | tuple):
        out = {}
        for i, value in enumerate(tree):
            out.update(_leaves(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def assert_bitwise_equal_checkpoints(a: Path, b: Path) -> None:
    """Every tensor equal (``torch.equal``, same dtype) and every plain value equal, except what
    names the run (its folder, the resume setting) and the per-run loss record (compared apart)."""
    from pfclib.checkpoint import load_checkpoint, load_head

    def leaves(path: Path) -> dict:
        # the head as a whole (a sharded one names its folder by a random token: not content)
        state = {**load_checkpoint(path), "head": load_head(path)}
        return {k: v for k, v in _leaves(state).items() if not skip.match(k)}

    skip = re.compile(r"^(config\.output_dir|config\.resume|metrics\..*)$")
    la, lb = leaves(a), leaves(b)
    assert sorted(la) == sorted(lb)
    for key, x in la.items():
        y = lb[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), key
        else:
            assert x == y, (key, x, y)


def _csv_losses(run: Path) -> list[tuple[int, str]]:
    with (run / "log.csv").open(newline="") as f:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("moment", list(KILL_MOMENTS), ids=lambda m: m.replace(":", "-"))
def test_sigkill_then_resume_matches_an_uninterrupted_run_bitwise(kill_lab, moment):
    from pfclib.checkpoint import checkpoint_path, head_folders, list_checkpoints, load_checkpoint

    _, start = KILL_MOMENTS[moment]
    ref = kill_lab.reference()
    got = kill_lab.interrupted(moment)
    ckpt_names = [n for n in got.after_kill if not n.startswith(".")]
    # what the kill left: only whole checkpoints up to `start`, and (a killed write) one partial temporary
    assert ckpt_names == [checkpoint_path(got.run, s).name for s in range(EVERY, start + 1, EVERY)]
    if moment.startswith("write:"):
        full_size = checkpoint_path(ref, int(moment.split(":")[1])).stat().st_size
        assert len(got.partial_sizes) == 1 and 0 < got.partial_sizes[0] < full_size, got.after_kill
    elif moment.startswith("shard:"):
        (folder,) = head_folders(checkpoint_path(ref, int(moment.split(":")[1])))
        full_size = (folder / "rank_00000.pt").stat().st_size
        assert len(got.partial_sizes) == 1 and 0 < got.partial_sizes[0] < full_size, got.after_kill
    else:
        assert got.partial_sizes == []
    for path in list_checkpoints(got.run):
        load_checkpoint(path)  # every file a kill could leave under a checkpoint's name is complete

    # the resumed run started where the newest whole checkpoint was and ended as the reference did
    metrics = json.loads((got.run / "metrics.json").read_text())
    reference = json.loads((ref / "metrics.json").read_text())
    assert metrics["start_step"] == start and metrics["steps"] == STEPS
    assert_bitwise_equal_checkpoints(checkpoint_path(ref, STEPS), checkpoint_path(got.run, STEPS))
    # the loss history, exactly: before the resume point from the checkpoint the resume read, after
    # it from the resumed run itself; and the CSV log has every step once, as the reference's
    before = load_checkpoint(metrics["resumed_from"])["metrics"]["loss_history"] if start else []
    assert before + metrics["loss_history"] == reference["loss_history"]
    assert _csv_losses(got.run) == _csv_losses(ref)
    assert [s for s, _ in _csv_losses(got.run)] == list(range(1, STEPS + 1))
    # and the resumed run removed the temporary a killed write left, and shards without a checkpoint
    assert _partial_files(got.run) == []
    for folder in (got.run / "checkpoints").glob("*.head-*"):
        owner = folder.parent / (folder.name.split(".head-")[0] + ".pt")
        assert load_checkpoint(owner)["head"]["folder"] == folder.name, folder
