"""python -m pfclib.export: every registered backbone to ONNX, checked with onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pfclib import models
from pfclib.export import MIN_COSINE, RTOL, check_onnx, export_onnx, main

SIZES = {"vit_tiny": 32, "iresnet_tiny": 32, "mobilefacenet_tiny": 32}  # the others at 112 px


def calibrated(name, size, embedding_size=64):
    """A backbone whose batch-norm statistics come from data (untrained defaults give outputs of
    1e-7 or 1e10, which would make any tolerance meaningless)."""
    torch.manual_seed(0)
    model = models.create(name, embedding_size=embedding_size, image_size=size)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    return model.eval()


@pytest.mark.parametrize("name", models.list_models())
def test_every_backbone_exports_with_a_dynamic_batch_and_matches_torch(name, tmp_path):
    size = SIZES.get(name, 112)
    model = calibrated(name, size)
    info = export_onnx(model, tmp_path / f"{name}.onnx", size)
    assert info["embedding_size"] == 64 and info["min_cosine"] >= MIN_COSINE
    assert info["max_abs_diff"] <= RTOL * info["max_abs_output"]
    assert 0.01 < info["max_abs_output"] < 1e4, "the comparison needs outputs of a sane scale"
    session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # neither the traced batch (2) nor the checked one (3)
        x = torch.randn(batch, 3, size, size)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=0, atol=RTOL * info["max_abs_output"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left"


def test_the_callers_model_is_left_as_it_was(tmp_path):
    model = models.create("iresnet_tiny", embedding_size=8, image_size=16, seed=0).double().train()
    export_onnx(model, tmp_path / "m.onnx", 16)
    assert model.training and next(model.parameters()).dtype == torch.float64


def test_the_check_fails_for_a_different_model(tmp_path):
    model = calibrated("iresnet_tiny", 32)
    export_onnx(model, tmp_path / "m.onnx", 32)
    other = calibrated("iresnet_tiny", 32)
    with torch.no_grad():
        other.features.weight.mul_(1.01)  # a mutated model: 1 % off in the last layer
    with pytest.raises(AssertionError, match="ONNX and torch outputs differ"):
        check_onnx(tmp_path / "m.onnx", other, torch.randn(3, 3, 32, 32))


def test_bad_arguments_are_named_and_an_unexportable_model_leaves_no_file(tmp_path, capsys):
    model = calibrated("iresnet_tiny", 32)
    with pytest.raises(ValueError, match="must be a .onnx file"):
        export_onnx(model, tmp_path / "m.pt", 32)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        export_onnx(model, tmp_path / "m.onnx", 0)
    with pytest.raises(ValueError, match="opset must be an int >= 17"):
        export_onnx(model, tmp_path / "m.onnx", 32, opset=11)

    class DataDependent(nn.Module):  # control flow on tensor values: torch.export refuses it
        def forward(self, x):
            if x.sum() > 0:
                return x.flatten(1)
            return -x.flatten(1)

    with pytest.raises(RuntimeError, match="torch could not export DataDependent"):
        export_onnx(DataDependent(), tmp_path / "bad.onnx", 8, check=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--onnx", str(tmp_path / "x.txt")])
    assert "--onnx must name a .onnx file" in capsys.readouterr().err


def test_command_line_exports_a_run_folders_newest_checkpoint(tmp_path, capsys):
    from pfclib.checkpoint import CHECKPOINT_FORMAT, checkpoint_path
    from pfclib.io import atomic_torch_save

    model = calibrated("iresnet_tiny", 32, embedding_size=16)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": {"backbone": "iresnet_tiny", "embedding_size": 16, "image_size": 32},
        "step": 4,
        "backbone": model.state_dict(),
        "head": {},
    }
    atomic_torch_save(state, checkpoint_path(tmp_path / "run", 4))
    out = tmp_path / "deploy" / "backbone.onnx"
    assert main(["--checkpoint", str(tmp_path / "run"), "--onnx", str(out)]) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], model(x).numpy(), atol=1e-4)
