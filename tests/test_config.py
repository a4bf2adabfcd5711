"""TrainConfig: YAML / dict round trips, unknown keys, type checks, overrides, the shipped presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pfclib.config import OptimConfig, TrainConfig, apply_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_through_dict_and_yaml(tmp_path):
    cfg = TrainConfig(max_steps=10)
    d = cfg.to_dict()
    assert TrainConfig.from_dict(d) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    # relative paths of a file are taken from the file's folder
    assert TrainConfig.from_yaml(path) == cfg.resolve_paths(tmp_path)


def test_relative_paths_follow_the_config_file_and_absolute_ones_stay(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "c.yaml").write_text(
        "max_steps: 1\noutput_dir: runs/a\ninit_from: ../other_run\nresume: auto\n"
        "data: {path: faces}\neval: {verification: [pairs.bin, /abs/lfw.bin]}\n"
    )
    monkeypatch.chdir(tmp_path)  # where the user stands plays no part for the file's paths
    cfg = TrainConfig.from_yaml("project/configs/c.yaml")
    base = folder.resolve()
    assert cfg.output_dir == str(base / "runs/a")
    assert cfg.data.path == str(base / "faces")
    assert cfg.init_from == str(base / "../other_run")
    assert cfg.eval.verification == [str(base / "pairs.bin"), "/abs/lfw.bin"]
    assert cfg.resume == "auto"  # a keyword, not a path
    assert cfg.resolve_paths("/elsewhere") == cfg  # idempotent: nothing relative is left
    explicit = TrainConfig(max_steps=1, resume="ckpt.pt").resolve_paths(tmp_path)
    assert explicit.resume == str(tmp_path / "ckpt.pt")


def test_nested_values_are_read_and_ints_widen_to_float():
    cfg = TrainConfig.from_dict(
        {"max_steps": 5, "optim": {"lr": 1, "betas": [0, 1]}, "head": {"sample_rate": 1}}
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.0, 1.0]
    assert cfg.head.sample_rate == 1.0
    assert cfg.optim.momentum == OptimConfig().momentum  # untouched default


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['optim.lr_warmup'\].*valid keys: \[.*'warmup_steps'"
    ):
        TrainConfig.from_dict({"max_steps": 1, "optim": {"lr_warmup": 3}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\] in config"):
        TrainConfig.from_dict({"max_steps": 1, "bogus": 1})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_steps": "10"}, r"max_steps must be int or None, got str"),
        ({"max_steps": True}, r"max_steps must be int or None, got bool"),
        ({"max_steps": 1, "optim": {"lr": "0.1"}}, r"optim.lr must be float, got str"),
        ({"max_steps": 1, "data": {"hflip": 1}}, r"data.hflip must be bool, got int"),
        ({"max_steps": 1, "eval": {"verification": "a.bin"}}, r"eval.verification must be list"),
        ({"max_steps": 1, "optim": 3}, r"optim must be a mapping, got int"),
    ],
)
def test_wrong_types_raise(data, message):
    with pytest.raises(TypeError, match=message):
        TrainConfig.from_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"one of max_steps or num_epochs must be set"),
        ({"max_steps": 0}, r"max_steps must be >= 1, got 0"),
        ({"max_steps": 1, "seed": -1}, r"seed must be a non-negative int, got -1"),
        ({"max_steps": 1, "head": {"sample_rate": 0.0}}, r"head.sample_rate must be in \(0, 1\], got 0.0"),
        (
            {"max_steps": 1, "head": {"update": "lazy"}},
            r"head.update must be one of \['dense', 'sparse'\], got 'lazy'",
        ),
        (
            {"max_steps": 1, "optim": {"optimizer": "lamb"}},
            r"optim.optimizer must be one of \['sgd', 'adamw'\]",
        ),
        (
            {"max_steps": 1, "mixed_precision": "fp8"},
            r"mixed_precision must be one of \['no', 'fp16', 'bf16'\]",
        ),
        ({"max_steps": 1, "device": "tpu"}, r"device must be 'auto', 'cpu' or 'cuda', got 'tpu'"),
        (
            {"max_steps": 1, "optim": {"gradient_accumulation_steps": 0}},
            r"gradient_accumulation_steps must be >= 1",
        ),
        ({"max_steps": 1, "checkpoint": {"keep": 0}}, r"checkpoint.keep must be >= 1, got 0"),
        ({"max_steps": 1, "log": {"progress": "maybe"}}, r"log.progress must be one of"),
    ],
)
def test_invalid_values_raise(data, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data)


def test_from_yaml_section_and_missing_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"prepare": {"x": 1}, "stages": {"train": {"max_steps": 7, "seed": 3}}}))
    cfg = TrainConfig.from_yaml(path, section="stages.train")
    assert (cfg.max_steps, cfg.seed) == (7, 3)
    with pytest.raises(KeyError, match=r"section 'train' not found .*keys: \['prepare', 'stages'\]"):
        TrainConfig.from_yaml(path, section="train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_from_yaml_never_executes_python_tags(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("max_steps: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match=r"evil\.yaml' is not valid YAML at line 1.*constructor") as info:
        TrainConfig.from_yaml(path)  # safe_load refuses the tag; the error names the file and the line
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_overrides_are_dotted_and_checked():
    cfg = TrainConfig(max_steps=3)
    new = cfg.replace(**{"optim.lr": 0.5, "head.margin": {"name": "cosface", "m": 0.35}, "resume": "auto"})
    assert new.optim.lr == 0.5 and new.head.margin == {"name": "cosface", "m": 0.35} and new.resume == "auto"
    assert cfg.optim.lr == 0.1  # the original is untouched
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['optim.lrr'\]"):
        cfg.replace(**{"optim.lrr": 1.0})
    with pytest.raises(ValueError, match=r"'seed' is a value \(0\), not a section"):
        apply_overrides(cfg.to_dict(), {"seed.x": 1})


def test_to_dict_is_plain_and_independent():
    cfg = TrainConfig(max_steps=3)
    d = cfg.to_dict()
    d["optim"]["betas"].append(1.0)
    d["backbone_kwargs"]["x"] = 1
    assert cfg.optim.betas == [0.9, 0.999] and cfg.backbone_kwargs == {}
    for key in ("backbone", "embedding_size", "image_size"):  # the checkpoint contract
        assert key in d


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_presets_parse_and_keep_their_files_inside_the_repository(name):
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert not Path(raw["output_dir"]).is_absolute() and not Path(raw["data"]["path"]).is_absolute()
    cfg = TrainConfig.from_yaml(ROOT / "configs" / name)
    for path in (cfg.output_dir, cfg.data.path, *cfg.eval.verification):
        # written relative to configs/, they land in the repository's git-ignored folders
        assert Path(path).resolve().relative_to(ROOT).parts[0] in ("scratch", "data", "results"), path


def test_yaml_1_1_traps_are_explained(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 5\noptim:\n  lr: 1e-3\n")  # YAML 1.1: a string, not a float
    with pytest.raises(
        TypeError,
        match=r"optim.lr must be float, got str: '1e-3' \(YAML reads 1e-3 as text; write it with a dot, e.g. 1.0e-03",
    ):
        TrainConfig.from_yaml(path)
    path.write_text("max_steps: 5\noptim:\n  head_lr: 1e-3\n")  # float | None: the same hint
    with pytest.raises(TypeError, match=r"write it with a dot"):
        TrainConfig.from_yaml(path)
    path.write_text("max_steps: 5\nlog:\n  progress: off\n")  # YAML 1.1: a bool
    with pytest.raises(
        TypeError, match=r"log.progress must be str, got bool: False \(YAML reads unquoted off/on"
    ):
        TrainConfig.from_yaml(path)
    path.write_text("max_steps: 5\noptim:\n  lr: 1.0e-3\nlog:\n  progress: 'off'\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.optim.lr == 1e-3 and cfg.log.progress == "off"


@pytest.mark.parametrize("key", ["lr", "head_lr"])
def test_learning_rates_must_be_finite(key):
    with pytest.raises(ValueError, match=rf"optim.{key} must be .*a finite number > 0, got inf"):
        TrainConfig.from_dict({"max_steps": 1, "optim": {key: float("inf")}})
