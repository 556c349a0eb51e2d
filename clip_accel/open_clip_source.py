"""Where an open_clip model comes from, converted to a plain CLIP folder once and cached by the checkpoint's hash.

`--model_name_or_path` names, besides transformers' folders and Hub ids:
- a folder open_clip wrote (`open_clip_config.json` and its weights, as `push_to_hf_hub` writes them);
- `hf-hub:ORG/NAME`, open_clip's name for such a folder on the Hub: its two files are downloaded as transformers
  downloads (its cache, HF_ENDPOINT, HF_TOKEN and offline mode apply);
- a checkpoint open_clip's training wrote (`epoch_N.pt`), with `--open_clip_model NAME`, its architecture.

Each is converted (open_clip_format.py) into CACHE/open_clip/DIGEST, a folder `from_pretrained` reads; DIGEST hashes
the config, the weights' bytes and the converter's version, so a changed file converts again and the same file, from
another path, process or run, does not. CACHE is $CLIP_ACCEL_CACHE, else $XDG_CACHE_HOME/clip_accel, else
~/.cache/clip_accel. Later loads need no open_clip (a conversion needs its installed BPE vocabulary file). Processes
that convert at once each write a folder of their own and rename it into place: the first wins, and all read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from .config import UserError
from .open_clip_format import (
    CONFIG_FILE,
    WEIGHT_FILES,
    convert,
    is_open_clip_folder,
    load_checkpoint_file,
    load_weights,
    read_folder,
)

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
CONVERTER_VERSION = 1  # raise when a conversion's output changes: older cached folders are then converted again
SOURCE_FILE = "converted_from.json"  # in the cached folder: what it was converted from


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("CLIP_ACCEL_CACHE") or os.path.join(base, "clip_accel")


def is_open_clip_source(name_or_path: str, open_clip_model: str | None = None) -> bool:
    """Whether load_pretrained converts `name_or_path` (else transformers loads it)."""
    if open_clip_model or name_or_path.startswith(HUB_PREFIX):
        return True
    return (
        os.path.isdir(name_or_path)
        and not os.path.isfile(os.path.join(name_or_path, "config.json"))
        and (is_open_clip_folder(name_or_path))
    )


def converted_folder(name_or_path: str, open_clip_model: str | None = None) -> str:
    """The cached CLIP folder of an open_clip source (see the module's docstring), converted now where missing."""
    if open_clip_model:
        if not os.path.isfile(name_or_path):
            raise UserError(
                f"--open_clip_model {open_clip_model} names the architecture of a checkpoint file open_clip's training "
                f"wrote (epoch_N.pt), but {name_or_path} is not a file: drop --open_clip_model for a folder or Hub id."
            )
        weights, settings = name_or_path, {"architecture": open_clip_model}
    elif name_or_path.startswith(HUB_PREFIX):
        settings_file, weights = _download(name_or_path.removeprefix(HUB_PREFIX))
        settings = _read_json(settings_file)
    else:
        settings_file, weights = read_folder(name_or_path)
        settings = _read_json(settings_file)
    digest = _digest(settings, weights)
    folder = os.path.join(cache_root(), "open_clip", digest)
    if os.path.isfile(os.path.join(folder, SOURCE_FILE)):
        logger.info("open_clip model %s: its CLIP conversion is cached in %s", name_or_path, folder)
        return folder
    if open_clip_model:
        model, processor = load_checkpoint_file(weights, open_clip_model)
    else:
        state_dict = load_weights(weights)
        model, processor = convert(settings["model_cfg"], state_dict, settings.get("preprocess_cfg"), name_or_path)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    written = tempfile.mkdtemp(prefix=f"{digest}.", dir=os.path.dirname(folder))
    model.save_pretrained(written)
    processor.save_pretrained(written)
    source = {"source": name_or_path, "open_clip_model": open_clip_model, "digest": digest}
    with open(os.path.join(written, SOURCE_FILE), "w") as file:
        json.dump({**source, "converter_version": CONVERTER_VERSION}, file, indent=2)
    try:
        os.rename(written, folder)
    except OSError:  # another process renamed its conversion into place first: the same bytes
        shutil.rmtree(written, ignore_errors=True)
    logger.info("open_clip model %s converted to a CLIP folder: %s (later loads read it)", name_or_path, folder)
    return folder


def _download(repo_id: str) -> tuple[str, str]:
    """(open_clip_config.json, the weights) of a Hub repo open_clip's push_to_hf_hub wrote, as local files."""
    from transformers.utils import cached_file  # transformers' Hub client: the library layer imports no Hub code

    try:
        settings_file = cached_file(repo_id, CONFIG_FILE, _raise_exceptions_for_missing_entries=False)
        weights = [cached_file(repo_id, name, _raise_exceptions_for_missing_entries=False) for name in WEIGHT_FILES]
    except OSError as error:
        raise UserError(f"hf-hub:{repo_id}: {error}") from error
    if settings_file is None:
        raise UserError(f"hf-hub:{repo_id} holds no {CONFIG_FILE}: it is not a model open_clip pushed to the Hub.")
    if not any(weights):
        raise UserError(f"hf-hub:{repo_id} holds {CONFIG_FILE} but no weights ({' or '.join(WEIGHT_FILES)}).")
    return settings_file, next(path for path in weights if path)


def _read_json(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def _digest(settings: dict, weights: str) -> str:
    """sha256 of the converter's version, the settings and the weights' bytes (a few seconds per GB), 32 hex digits."""
    digest = hashlib.sha256(json.dumps([CONVERTER_VERSION, settings], sort_keys=True).encode())
    with open(weights, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:32]
