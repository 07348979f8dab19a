"""Typed config: YAML + `a.b=c` overrides; every bad key or value fails at load time in one clear sentence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from racedit.config import ABSENT, Config, ConfigError, config_diff, from_yaml_text, load_config, to_yaml
from racedit.models import create_model, resolve_model_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def error_of(*overrides: str, path: str | Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"multi-line error: {message!r}"
    assert "full_key" not in message and "reference_type" not in message and "object_type" not in message
    return message


# What a preset name means, written out from the papers: size -> (depth, width, heads) from DiT's Table 1
# (S, B, L, XL) and Race-DiT's M; "/p" is the patch side and "-kinE" k active of E experts per token.
PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "M": (16, 960, 16), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# Every config file under configs/; the ablation grids (a `base` config plus variants) are not configs.
CONFIG_FILES = sorted(p for p in DEMO.parent.rglob("*.yaml") if "base" not in yaml.safe_load(p.read_text()))


def test_config_files_are_found():
    names = {p.relative_to(DEMO.parent).as_posix() for p in CONFIG_FILES}
    assert {"demo.yaml", "ablations/base/digits.yaml", "imagenet256/dit-xl2.yaml"} <= names
    assert not any(n.startswith("ablations/") and "/" not in n[len("ablations/"):] for n in names)  # grids


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(DEMO.parent).as_posix())
def test_every_config_file_means_what_it_says_and_round_trips(path):
    """Each config file loads; every value it sets arrives (read here with plain YAML); the model fields
    it leaves out take what its preset name means in the papers; the data matches the model's input; and
    the saved form (written beside each checkpoint) reads back to the same config."""
    written = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    for section, values in written.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, (section, key)

    family, size, patch, k, experts = re.fullmatch(r"(DiT|RaceDiT)-(S|B|M|L|XL)/(\d)(?:-(\d+)in(\d+))?",
                                                   cfg.model.name).groups()
    meaning = dict(zip(("depth", "hidden_size", "num_heads"), PAPER_SIZES[size]), patch_size=int(patch),
                   moe_k=int(k or 0), moe_experts=int(experts or 0))
    model = resolve_model_config(cfg.model)
    for key, value in meaning.items():
        assert getattr(model, key) == written["model"].get(key, value), key
    assert (family == "RaceDiT") == (model.moe_experts > 0)

    if cfg.data.kind == "latents":  # ImageNet 256x256 through SD-VAE: 32x32x4 latents, 1000 classes
        assert path.parent.name == "imagenet256"
        assert (model.input_size, model.in_channels, model.num_classes) == (256 // 8, 4, 1000)
    else:  # the 8x8 grey digits, 10 classes
        assert cfg.data.kind == "digits"
        assert (model.input_size, model.in_channels, model.num_classes) == (cfg.data.image_size, 1, 10)

    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_overrides_apply_with_their_types():
    cfg = load_config(DEMO, ["train.steps=7", "train.lr=3e-4", "model.learn_sigma=true", "train.betas=[0.9,0.95]",
                             "sample.sampler=euler", "diffusion.objective=flow", "model.depth=3"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.learn_sigma is True
    assert cfg.train.betas == [0.9, 0.95]
    assert (cfg.sample.sampler, cfg.diffusion.objective, cfg.model.depth) == ("euler", "flow", 3)
    assert load_config(None, ["train.steps=5"]).train.steps == 5  # overrides of the defaults alone


def test_unknown_key_names_it_and_the_allowed_keys():
    msg = error_of("train.stepz=5", path=DEMO)
    assert "'train.stepz'" in msg and "steps" in msg and "override 'train.stepz=5'" in msg
    msg = error_of("nope=1")
    assert "'nope'" in msg and "model" in msg


def test_unknown_key_in_the_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: DiT-S/2\n  widht: 3\n")
    msg = error_of(path=f)
    assert str(f) in msg and "'model.widht'" in msg and "hidden_size" in msg
    assert "defaults" not in msg


@pytest.mark.parametrize("item,key,value,expected", [
    ("train.steps=abc", "train.steps", "'abc'", "int"),
    ("train.lr=fast", "train.lr", "'fast'", "float"),
    ("train.betas=3", "train.betas", "3", "list[float]"),
    ("model.depth=deep", "model.depth", "'deep'", "int"),
    ("train.steps=null", "train.steps", "None", "int"),
])
def test_wrong_type_names_key_value_and_type(item, key, value, expected):
    msg = error_of(item, path=DEMO)
    assert f"'{key}'" in msg and value in msg and expected in msg
    assert f"override '{item}'" in msg  # says the override was the culprit, not "defaults" or the file


def test_wrong_type_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: many\n")
    msg = error_of(path=f)
    assert str(f) in msg and "'train.steps'" in msg and "'many'" in msg and "int" in msg


def test_section_given_a_scalar_names_the_section():
    msg = error_of("train=3")
    assert "'train'" in msg and "mapping" in msg and "steps" in msg


def test_unknown_preset_names_it_and_the_accepted_forms():
    msg = error_of("model.name=DiT-Q/2")
    assert "'model.name'" in msg and "DiT-Q/2" in msg and "DiT-XL/2" in msg
    msg = error_of("model.name=DiT-S/3")
    assert "DiT-S/3" in msg and "(2, 4, 8)" in msg


@pytest.mark.parametrize("item,allowed", [
    ("diffusion.objective=edm", "'flow'"),
    ("sample.sampler=plms", "'heun'"),
    ("train.mixed_precision=fp8", "'bf16'"),
    ("model.routing=random", "'expert_race'"),
])
def test_bad_choice_names_key_value_and_allowed(item, allowed):
    key, value = item.split("=")
    msg = error_of(item)
    assert f"'{key}'" in msg and f"'{value}'" in msg and allowed in msg


@pytest.mark.parametrize("item,key", [("train.steps=0", "train.steps"), ("train.ema_decay=1.5", "train.ema_decay"),
                                      ("model.class_dropout_prob=1.0", "model.class_dropout_prob")])
def test_out_of_range_value_names_it(item, key):
    assert f"'{key}'" in error_of(item)


def test_override_without_equals_and_missing_file():
    assert "key=value" in error_of("train.steps")
    assert "not found" in error_of(path="/nonexistent/c.yaml")


def test_saved_config_round_trips():
    cfg = load_config(DEMO, ["train.steps=9", "model.depth=2"])
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_a_sampler_of_the_other_objective_is_refused_at_load_time():
    with pytest.raises(ConfigError, match=r"'sample.sampler': 'ddim' does not apply to diffusion.objective=flow.*euler"):
        load_config(DEMO, ["diffusion.objective=flow"])  # the demo samples with ddim
    with pytest.raises(ConfigError, match="'heun' does not apply to diffusion.objective=ddpm"):
        load_config(DEMO, ["sample.sampler=heun"])
    assert load_config(DEMO, ["diffusion.objective=flow", "sample.sampler=heun"]).sample.sampler == "heun"


def test_config_diff_of_a_hand_built_pair():
    a = Config()
    b = Config()
    b.model.depth, b.train.seed, b.train.betas, b.model.memory_blocks = 3, 7, [0.9, 0.95], [1]
    expected = {"model.depth": (a.model.depth, 3), "model.memory_blocks": ([], [1]),
                "train.betas": ([0.9, 0.999], [0.9, 0.95]), "train.seed": (0, 7)}
    assert config_diff(a, b) == expected
    assert config_diff(a, a) == {} and config_diff(OmegaConf.structured(a), b) == expected
    # plain mappings (parsed YAML), with keys only one side has
    assert config_diff({"train": {"seed": 0, "lr": 1.0}}, {"train": {"seed": 1}, "new": {"x": None}}) == {
        "new.x": (ABSENT, None), "train.lr": (1.0, ABSENT), "train.seed": (0, 1)}


@pytest.mark.parametrize("items,k,e", [
    (["model.name=RaceDiT-S/2-9in8"], 9, 8), (["model.name=RaceDiT-S/2-0in8"], 0, 8),
    (["model.name=RaceDiT-S/2-2in0"], 2, 0), (["model.name=RaceDiT-S/2-2in8", "model.moe_k=9"], 9, 8),
    (["model.name=DiT-S/2", "model.moe_k=2"], 2, 0),  # k without experts: not silently dense
])
def test_a_bad_moe_shape_is_refused_at_load_time_naming_the_keys(items, k, e):
    with pytest.raises(ConfigError) as info:
        load_config(None, items)
    msg = str(info.value)
    assert "model.moe_k" in msg and "model.moe_experts" in msg and f"got k={k}, E={e}" in msg
    assert load_config(None, ["model.name=DiT-S/2", "model.moe_experts=4", "model.moe_k=4"]).model.moe_k == 4


def test_models_built_in_code_get_the_same_moe_shape_check():
    with pytest.raises(ConfigError, match=r"model.moe_k <= model.moe_experts.*got k=9, E=8"):
        create_model("RaceDiT-S/2-2in8", moe_k=9)
