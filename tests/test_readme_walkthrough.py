"""The README's "your own folder of faces, in five commands" runs as written: each line is parsed out
of README.md and run (in this process, from a scratch folder laid out like the repository) on tiny
images, with only the --set / size options below appended to make it fast."""

from __future__ import annotations

import importlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np

from tests.test_pairs import make_folder

ROOT = Path(__file__).resolve().parents[1]

# appended to the README's lines: a tiny network and enough held-out identities for tiny data
SHRINK = {
    "pfclib.data.pairs": ["--pairs", "40", "--holdout", "0.5", "--image-size", "32"],
    "pfclib.train": [
        "--set", "device=cpu", "--set", "mixed_precision=no", "--set", "backbone=iresnet_tiny",
        "--set", "embedding_size=16", "--set", "image_size=32", "--set", "max_steps=2", "--set", "num_epochs=null",
        "--set", "data.batch_size=8", "--set", "data.num_workers=0", "--set", "log.tensorboard=false",
        "--set", "eval.every=0", "--set", "checkpoint.every=0",
    ],
    "pfclib.eval": ["--batch-size", "16"],
    "pfclib.embed": ["--batch-size", "16"],
    "pfclib.export": [],
}  # fmt: skip


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walkthrough:start -->")[1].split("<!-- walkthrough:end -->")[0]
    lines = [line for line in block.splitlines() if line.startswith("python -m ")]
    return [shlex.split(line.split("#")[0]) for line in lines]


def test_the_readme_walkthrough_is_five_commands_that_run(tmp_path, monkeypatch):
    commands = readme_commands()
    assert len(commands) == 5 and [c[2] for c in commands] == list(SHRINK)
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "example_folder.yaml", tmp_path / "configs")
    make_folder(tmp_path / "data" / "my_faces", identities=40, per=3, size=24)
    monkeypatch.chdir(tmp_path)  # "from the repository root"
    for argv in commands:
        module = argv[2]
        result = importlib.import_module(module).main([*argv[3:], *SHRINK[module]])
        assert result in (0, None) or isinstance(result, dict), (module, result)
    run = tmp_path / "results" / "train" / "r50_my_faces_pfc0.3"
    assert (tmp_path / "data" / "my_faces_pairs.bin").is_file()
    assert len(list((tmp_path / "data" / "my_faces_train").iterdir())) == 20  # the other half
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and set(metrics["verification"]) == {"my_faces_pairs"}
    scored = json.loads((run / "eval.json").read_text())
    assert scored["checkpoint"].endswith("ckpt_00000002.pt") and "my_faces_pairs" in scored["sets"]
    emb = np.load(run / "embeddings.npy")
    assert emb.shape == (140, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (run / "backbone.onnx").stat().st_size > 0
