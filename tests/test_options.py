"""What the command line sets wins over a recipe, for options that exclude each other too; where both were typed
(or one recipe sets both) the run stops naming both, and an error that names a recipe's value says where it came
from."""

from __future__ import annotations

import logging

import pytest
import yaml

from clip_accel.config import UserError
from clip_accel.options import EXCLUSIVE, TOGETHER_ALLOWED, parse_config

# A used value of each option of the exclusive pairs, as a recipe holds it and as it is typed.
USED = {
    "data_dir": None,  # the demo folder (a fixture)
    "dataset_name": "json",
    "demo": True,
    "model_name_or_path": "someone/clip",
    "scratch_config": "clip-tiny",
    "open_clip_model": "ViT-B-32",
    "lora_rank": 8,
    "freeze": "backbones",
    "layer_decay": 0.6,
    "warmup_steps": 5,
    "warmup_ratio": 0.1,
    "streaming": True,
    "max_train_samples": 10,
    "cache_format": "jpeg",
}


def typed(name: str, value) -> list[str]:
    return [f"--{name}"] if value is True else [f"--{name}", str(value)]


def field_of(configs, name: str):
    return next(getattr(config, name) for config in configs if hasattr(config, name))


def base_source(first: str, second: str) -> dict:
    """A data source for pairs that do not choose one themselves (a stream needs --dataset_name)."""
    if {first, second} & {"data_dir", "dataset_name", "demo"}:
        return {}
    return {"dataset_name": "json"} if "streaming" in (first, second) else {"demo": True}


@pytest.fixture
def used(demo_dir):
    return {**USED, "data_dir": demo_dir}


@pytest.fixture
def write_recipe(tmp_path):
    def write(values: dict) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    return write


def test_recipe_values_are_defaults_that_the_command_line_overrides(tmp_path, demo_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data_dir: {demo_dir}\nlearning_rate: 1.0e-4\nfreeze: backbones\nnum_train_epochs: 7\n")
    data, model, train = parse_config(["--config", str(recipe), "--learning_rate", "3e-5"])
    assert data.data_dir == demo_dir
    assert model.freeze == "backbones"
    assert train.num_train_epochs == 7 and train.learning_rate == 3e-5


def test_every_shipped_recipe_parses():
    import glob

    recipes = sorted(glob.glob("clip_accel/recipes/*.yaml"))
    assert recipes
    for recipe in recipes:
        parse_config(["--config", recipe, "--demo"]) if "demo" not in recipe else parse_config(["--config", recipe])


def test_unknown_recipe_key_is_an_error_not_ignored(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("demo: true\nlearning_rte: 1.0e-4\n")
    with pytest.raises(ValueError, match="learning_rte"):
        parse_config(["--config", str(recipe)])


def test_missing_recipe_file_says_so():
    with pytest.raises(ValueError, match="neither a YAML file nor a bundled recipe"):
        parse_config(["--config", "nope.yaml"])


def test_the_issue_case_a_typed_model_folder_is_fine_tuned_not_the_recipes_scratch_model(caplog):
    with caplog.at_level(logging.WARNING, logger="clip_accel"):
        data, model, train = parse_config(["--config", "demo", "--model_name_or_path", "outputs/demo"])
    assert (model.model_name_or_path, model.scratch_config) == ("outputs/demo", None)
    assert data.demo and train.num_train_epochs == 10  # the rest of the recipe stays
    assert "--scratch_config clip-tiny (from the demo recipe) is dropped: --model_name_or_path outputs/demo" in (
        caplog.text
    )


@pytest.mark.parametrize("first, second, why", EXCLUSIVE, ids=[f"{a}-{b}" for a, b, _ in EXCLUSIVE])
def test_a_typed_option_drops_the_recipe_option_it_excludes(first, second, why, used, write_recipe):
    for in_recipe, on_command_line in ((first, second), (second, first)):
        recipe = write_recipe({**base_source(first, second), in_recipe: used[in_recipe]})
        configs = parse_config(["--config", recipe, *typed(on_command_line, used[on_command_line])])
        assert field_of(configs, on_command_line) == used[on_command_line]
        assert field_of(configs, in_recipe) != used[in_recipe], f"the recipe's --{in_recipe} beat the typed one"


@pytest.mark.parametrize("first, second, why", EXCLUSIVE, ids=[f"{a}-{b}" for a, b, _ in EXCLUSIVE])
def test_both_options_typed_or_both_in_one_recipe_are_refused_naming_both(first, second, why, used, write_recipe):
    source = [arg for name, value in base_source(first, second).items() for arg in typed(name, value)]
    both_typed = [*source, *typed(first, used[first]), *typed(second, used[second])]
    recipe = write_recipe({**base_source(first, second), first: used[first], second: used[second]})
    if (first, second) in TOGETHER_ALLOWED:  # --demo --data_dir DIR: the demo is written to DIR
        for argv in (both_typed, ["--config", recipe]):
            assert field_of(parse_config(argv), first) == used[first]
        return
    with pytest.raises(UserError, match=f"--{first} .*and --{second} .*exclude each other") as typed_error:
        parse_config(both_typed)
    assert "recipe" not in str(typed_error.value) and why in str(typed_error.value)
    with pytest.raises(UserError, match=f"--{first} .*\\(from the recipe .*\\) and --{second} .*\\(from the recipe"):
        parse_config(["--config", recipe])


def test_an_error_naming_a_recipe_value_says_which_recipe_set_it(write_recipe):
    recipe = write_recipe({"demo": True, "augment_scale": [0.5, 1.0]})
    with pytest.raises(UserError, match=r"--augment_scale \[0.5, 1.0\]: from the recipe .*recipe.yaml"):
        parse_config(["--config", recipe])
    with pytest.raises(UserError) as error:  # typed, it is the user's own: no recipe named
        parse_config(["--demo", "--augment_scale", "0.5", "1.0"])
    assert "recipe" not in str(error.value)


def test_turning_an_option_off_drops_the_recipe_values_that_only_shape_it(write_recipe, demo_dir):
    recipe = write_recipe({"demo": True, "augment": True, "augment_scale": [0.5, 1.0], "augment_flip": True})
    data = parse_config(["--config", recipe, "--augment", "false"])[0]
    assert (data.augment, data.augment_scale, data.augment_flip) == (False, [0.9, 1.0], False)
    stream = write_recipe({"dataset_name": "json", "streaming": True, "epoch_rows": 100, "shuffle_buffer": 10})
    data = parse_config(["--config", stream, "--data_dir", demo_dir])[0]  # -> dataset_name -> streaming -> epoch_rows
    assert (data.data_dir, data.dataset_name, data.streaming, data.epoch_rows) == (demo_dir, None, False, None)


def test_an_empty_value_unsets_a_recipe_option():
    model = parse_config(["--config", "demo", "--scratch_config", ""])[1]
    assert model.scratch_config is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--demo", "--num_train_epoch", "3"], "did you mean --num_train_epochs"),
        (["--demo", "--max_step", "3"], "did you mean --max_steps"),  # abbreviations are misspellings
        (["--demo", "--freeze", "half"], "invalid choice: 'half'"),
    ],
)
def test_a_misspelt_option_or_bad_choice_is_a_user_error_with_the_nearest_names(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(argv)


def test_a_misspelt_recipe_key_gets_the_nearest_name(write_recipe):
    with pytest.raises(UserError, match="learning_rte: did you mean learning_rate"):
        parse_config(["--config", write_recipe({"demo": True, "learning_rte": 1e-4})])
