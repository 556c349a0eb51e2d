"""`clip-accel train`'s options: a `--config` recipe gives defaults, and what the command line sets wins.

That includes options that exclude each other: `--config demo --model_name_or_path FOLDER` fine-tunes FOLDER,
because the typed model drops the recipe's `scratch_config` (and says so). Where both were typed, or a recipe sets
both, the run stops naming both; an error that names a recipe's value says which recipe it came from. `''` unsets
an option whose default is unset (`--scratch_config ''`).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
from dataclasses import MISSING, fields
from importlib import resources

import yaml

from .config import CONFIG_CLASSES, DataConfig, ModelConfig, TrainConfig, UserError

logger = logging.getLogger(__name__)

# Pairs of options that exclude each other, with why. An option is "used" when it holds another value than its
# default (model_name_or_path: when given at all, its default being a model too).
EXCLUSIVE = (
    ("data_dir", "dataset_name", "choose one data source"),
    ("dataset_name", "demo", "choose one data source"),
    ("data_dir", "demo", "choose one data source; with --demo, --data_dir is where the demo is written"),
    ("model_name_or_path", "scratch_config", "start from a model, or build one from scratch"),
    ("lora_rank", "scratch_config", "LoRA adapts a pretrained model"),
    ("open_clip_model", "scratch_config", "an open_clip checkpoint is a model to start from"),
    ("lora_rank", "freeze", "LoRA trains only its adapters, everything else is frozen"),
    ("lora_rank", "layer_decay", "LoRA trains only its adapters, not the layers layer decay would scale"),
    ("warmup_steps", "warmup_ratio", "give the warmup one way"),
    ("streaming", "max_train_samples", "a stream's epoch is --epoch_rows long"),
    ("streaming", "cache_format", "a stream caches no training images"),
)
# Typed together, or set together by one recipe, these two mean "write the demo catalogue there".
TOGETHER_ALLOWED = {("data_dir", "demo")}
# Options that only shape another one: a recipe's value goes when the command line turns that one off (or drops it).
SHAPES = {
    "streaming": "dataset_name",
    "open_clip_model": "model_name_or_path",
    **dict.fromkeys(("epoch_rows", "shuffle_buffer", "shard_index", "shard_cache_dir"), "streaming"),
    **dict.fromkeys(("augment_scale", "augment_flip"), "augment"),
}
ALWAYS_A_CHOICE = {"model_name_or_path"}
DEFAULTS = {
    f.name: f.default if f.default is not MISSING else f.default_factory()
    for cls in CONFIG_CLASSES
    for f in fields(cls)
}


def parse_config(args: list[str] | None = None) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """Parse `--config recipe.yaml` (defaults) and the command line (which wins) into the three configs."""
    pre_parser = CommandParser(add_help=False)
    pre_parser.add_argument("--config", default=None)
    known, remaining = pre_parser.parse_known_args(args)  # (abbreviations off: --conf is not --config)
    parser = _parser()
    typed = _typed_options(parser, remaining)
    recipe, label = ({}, "") if known.config is None else (load_recipe(known.config), _recipe_label(known.config))
    recipe = _drop_what_typed_options_exclude(recipe, typed, label)
    parser.set_defaults(**recipe)
    values = _values(parser.parse_args(remaining))
    _refuse_exclusive_pairs(values, typed, recipe, label)
    try:
        return tuple(cls(**{f.name: values[f.name] for f in fields(cls)}) for cls in CONFIG_CLASSES)
    except UserError as error:
        raise UserError(_naming_recipe_values(str(error), typed, recipe, label)) from None


class UserErrorsParser:
    """argparse's errors as UserErrors (the command prints one line, on the main process only), and a misspelt
    option named with the nearest names; no abbreviations: `--max_step` is a misspelling, not `--max_steps`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        unrecognized = "unrecognized arguments: "
        if message.startswith(unrecognized):
            message = unknown_options_message(self, message.removeprefix(unrecognized).split())
        raise UserError(f"{message} (`{self.prog} --help` lists the options)")


class CommandParser(UserErrorsParser, argparse.ArgumentParser):
    """The parser of every `clip-accel` command."""


def _parser() -> argparse.ArgumentParser:
    """The options of the three dataclasses (HfArgumentParser) and --config."""
    from transformers import HfArgumentParser

    parser = type("TrainParser", (UserErrorsParser, HfArgumentParser), {})(CONFIG_CLASSES, prog="clip-accel train")
    parser.add_argument(
        "--config", default=None, help="YAML recipe (a path or a bundled recipe's name) whose values become defaults."
    )
    return parser


def unknown_options_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """argparse's "unrecognized arguments", with the nearest option names for each misspelt one."""
    names = [name for action in parser._actions for name in action.option_strings if name.startswith("--")]
    names = [name for name in names if "-" not in name[2:]]  # not HfArgumentParser's --dashed-aliases
    hints = []
    for option in unknown:
        close = difflib.get_close_matches(option.split("=")[0], names, n=3, cutoff=0.75)
        if option.startswith("--") and close:
            hints.append(f"{option}: did you mean {' or '.join(close)}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")


def _typed_options(parser: argparse.ArgumentParser, args: list[str]) -> dict:
    """The options the command line sets, with their parsed values (every default hidden for one parse)."""
    saved = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return _values(parser.parse_args(args))  # (a misspelt option stops here: `UserErrorsParser.error`)
    finally:
        for action, default in saved.items():
            action.default = default


def _values(namespace: argparse.Namespace) -> dict:
    """The options of a parse (not --config), `''` as unset for an option whose default is unset."""
    values = {name: value for name, value in vars(namespace).items() if name != "config"}
    return {name: None if value == "" and DEFAULTS[name] is None else value for name, value in values.items()}


def _used(name: str, value, given: bool) -> bool:
    return given if name in ALWAYS_A_CHOICE else value != DEFAULTS[name]


def _drop_what_typed_options_exclude(recipe: dict, typed: dict, label: str) -> dict:
    """The recipe without the values a typed option excludes or turns off, each drop logged once."""
    recipe, dropped = dict(recipe), set()
    while True:  # a drop can turn off what another recipe value shapes (dataset_name -> streaming -> epoch_rows)
        reasons = {name: _excluded(name, value, typed, dropped) for name, value in recipe.items() if name not in typed}
        reasons = {name: reason for name, reason in reasons.items() if reason}
        if not reasons:
            return recipe
        for name, reason in reasons.items():
            if int(os.environ.get("RANK", "0")) == 0:  # one line per launch, not one per process
                logger.warning(f"{_option(name, recipe[name])} (from {label}) is dropped: {reason}.")
            del recipe[name]
            dropped.add(name)


def _excluded(name: str, value, typed: dict, dropped: set) -> str | None:
    """Why the command line excludes this recipe value, if it does."""
    if not _used(name, value, given=True):
        return None
    for first, second, why in EXCLUSIVE:
        if name in (first, second):
            other = second if name == first else first
            if other in typed and _used(other, typed[other], given=True):
                return f"{_option(other, typed[other])} was given ({why})"
    shaped = SHAPES.get(name)
    if shaped in dropped or (shaped in typed and not _used(shaped, typed[shaped], given=True)):
        return f"it shapes --{shaped}, which the command line {'dropped' if shaped in dropped else 'turned off'}"
    return None


def _refuse_exclusive_pairs(values: dict, typed: dict, recipe: dict, label: str) -> None:
    """Both options of an exclusive pair typed, or both set by the recipe: say which two, and where each came from."""
    for first, second, why in EXCLUSIVE:
        given = {name: name in typed or name in recipe for name in (first, second)}
        if not all(_used(name, values[name], given[name]) for name in (first, second)):
            continue
        both_typed = first in typed and second in typed
        if (first, second) in TOGETHER_ALLOWED and (both_typed or not ({first, second} & set(typed))):
            continue
        named = " and ".join(_option(name, values[name], typed, recipe, label) for name in (first, second))
        unset = " or ".join(_unset(name) for name in (first, second) if name not in ALWAYS_A_CHOICE)
        raise UserError(f"{named} exclude each other ({why}): keep one (unset the other with {unset}).")


def _naming_recipe_values(message: str, typed: dict, recipe: dict, label: str) -> str:
    """An error that names options the recipe set (and the command line did not) says so."""
    named = dict.fromkeys(re.findall(r"--(\w+)", message))
    from_recipe = [name for name in named if name in recipe and name not in typed]
    if not from_recipe:
        return message
    values = ", ".join(_option(name, recipe[name]) for name in from_recipe)
    return f"{message} ({values}: from {label}; the command line overrides it, e.g. {_unset(from_recipe[0])}.)"


def _option(name: str, value, typed: dict | None = None, recipe: dict | None = None, label: str = "") -> str:
    shown = f"--{name}" if value is True else f"--{name} {value}"
    if typed is not None and name not in typed and name in (recipe or {}):
        shown += f" (from {label})"
    return shown


def _unset(name: str) -> str:
    default = DEFAULTS[name]
    shown = "''" if default is None else str(default).lower() if isinstance(default, bool) else default
    return f"--{name} {shown}"


def _recipe_label(name_or_path: str) -> str:
    return f"the recipe {name_or_path}" if os.path.isfile(name_or_path) else f"the {name_or_path} recipe"


def recipe_path(name_or_path: str) -> str:
    """A recipe YAML: a path, or the name of a recipe shipped with the package (`demo`, `indo_fashion_best`, ...)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    bundled = resources.files("clip_accel") / "recipes" / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return str(bundled)
    raise UserError(
        f"--config {name_or_path!r} is neither a YAML file nor a bundled recipe; bundled recipes: {bundled_recipes()}."
    )


def bundled_recipes() -> list[str]:
    folder = resources.files("clip_accel") / "recipes"
    return sorted(path.name.removesuffix(".yaml") for path in folder.iterdir() if path.name.endswith(".yaml"))


# Options renamed since the first release: a recipe that still uses the old name gets the new one in the error.
RENAMED_OPTIONS = {"model_config": "scratch_config"}


def load_recipe(name_or_path: str) -> dict:
    """Read a recipe YAML and check that every key is a known option, so a typo fails instead of being ignored."""
    path = recipe_path(name_or_path)
    with open(path) as handle:
        try:
            recipe = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise UserError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path} must be a YAML mapping of option: value, got {type(recipe).__name__}.")
    unknown = sorted(set(recipe) - set(DEFAULTS))
    if unknown:
        renamed = [f"{old} is now {RENAMED_OPTIONS[old]}" for old in unknown if old in RENAMED_OPTIONS]
        close = [
            f"{old}: did you mean {match[0]}?"
            for old in unknown
            if old not in RENAMED_OPTIONS and (match := difflib.get_close_matches(old, DEFAULTS, n=1))
        ]
        raise UserError(
            f"{path}: unknown option(s) {unknown}"
            + (f" ({'; '.join(renamed + close)})" if renamed or close else "")
            + ". Run `clip-accel train --help` for the valid names."
        )
    return recipe
