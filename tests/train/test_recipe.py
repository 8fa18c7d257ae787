"""Recipes: YAML + key=value overrides into typed configs; unknown keys name the closest valid one."""

from pathlib import Path

import pytest
import yaml

from llmlab.cli.main import main
from llmlab.train import PretrainConfig, RecipeError, SFTConfig, load_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_are_parsed_as_yaml_and_checked_against_types():
    cfg = load_recipe(PretrainConfig, None, ["train.lr=1e-3", "train.max_steps=1e3", "data.sources=[a.txt, b]",
                                             "tokenizer.path=null", "train.compile=true", "model.dim=32",
                                             "train.sample_prompts=[hello, 'x: y']", "data.sources=english"])
    assert cfg.train.lr == 0.001 and cfg.train.max_steps == 1000 and cfg.train.compile is True
    assert cfg.data.sources == ["english"]  # the last override wins; a single string becomes a list
    assert cfg.tokenizer.path is None and cfg.model == {"dim": 32}
    assert cfg.train.sample_prompts == ["hello", "x: y"]


@pytest.mark.parametrize("override, closest", [
    ("train.lrr=1", "train.lr"), ("trian.lr=1", "train.lr"), ("lr=1", "train.lr"),
    ("data.seqlen=64", "data.seq_len"), ("model.dimm=64", "model.dim"), ("train.max_step=3", "train.max_steps"),
])
def test_unknown_key_names_the_closest_valid_key(override, closest):
    with pytest.raises(RecipeError, match=f"unknown recipe key .*did you mean '{closest}'"):
        load_recipe(PretrainConfig, None, [override])


def test_unknown_key_far_from_everything_lists_the_section():
    with pytest.raises(RecipeError, match="valid keys under train: .*lr.*max_steps"):
        load_recipe(PretrainConfig, None, ["train.qqqqzzz=1"])


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=abc", "data.seq_len must be an integer"),
    ("train.lr=fast", "train.lr must be a number"),
    ("train.compile=maybe", "train.compile must be true or false"),
    ("data.sources={a: 1}", "data.sources must be a list"),
    ("train.schedule=cosin", "schedule='cosin' is not one of"),
    ("train.max_steps=0", "max_steps must be >= 1"),
    ("no_equals_sign", "is not key=value"),
])
def test_bad_values_say_which_key_and_what_is_expected(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(PretrainConfig, None, [override])


def test_nested_sections_keep_their_workflow_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1.0e-4\n")
    cfg = load_recipe(SFTConfig, recipe)
    assert cfg.train.lr == 1e-4
    assert cfg.train.eval_at_start is True and cfg.train.weight_decay == 0.0  # SFT's defaults, not TrainConfig's


def test_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(PretrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(PretrainConfig, bad)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "pretrain").glob("*.yaml")) +
                         sorted((ROOT / "recipes" / "sft").glob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipes_load_and_round_trip(path, tmp_path):
    cls = PretrainConfig if path.parent.name == "pretrain" else SFTConfig
    cfg = load_recipe(cls, path)
    saved = save_recipe(cfg, tmp_path / "config.yaml")
    assert load_recipe(cls, saved) == cfg
    assert yaml.safe_load(saved.read_text())["train"]["max_steps"] == cfg.train.max_steps


def test_cli_reports_unknown_keys_and_prints_config(capsys):
    recipe = str(ROOT / "recipes" / "pretrain" / "nano.yaml")
    assert main(["pretrain", "--recipe", recipe, "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["pretrain", "--recipe", recipe, "--print-config", "train.lr=0.01"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.01 and printed["preset"] == "nano"
    assert main(["sft", "--print-config", "data.max_conversations=8"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["max_conversations"] == 8
