"""Model card and Hugging Face Hub publishing.

The card is rendered from the output folder's own files (eval_results.json, training_config.json,
config.json), so every figure on it is one the run measured. Publishing is one commit of the
finished folder; access is checked before training so a missing or read-only token fails in seconds, not after
the run. The token is never passed around here: huggingface_hub reads it (HF_TOKEN or `hf auth login`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from importlib import metadata, resources
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

from . import __version__
from .config import RECALL_KS, UserError
from .data.demo import DEMO_MARKER
from .lora import ADAPTER_DIR
from .model import CLIP, FAMILIES, embedding_size
from .onnx_export import ONNX_FOLDER
from .open_clip_source import HUB_PREFIX
from .results import RECALL_COLUMNS, format_results_table, markdown_table, metric_cells, with_starting_model

try:  # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx; connection errors derive from these
    from httpx2 import HTTPError as _TransportError
except ImportError:  # pragma: no cover
    from httpx import HTTPError as _TransportError

logger = logging.getLogger(__name__)  # plain logging: the push command runs without an Accelerator
CARD_NAME = "README.md"
CARD_TEMPLATE = "model_card_template.md"  # at the repository's top level; in the wheel inside the package
CARD_MARKER = "Written by clip_accel"  # in model_card_template.md: tells our cards from hand-written ones
# Local image paths and per-row reasons: useful on your machine, noise (and possibly private) on the Hub.
NOT_PUSHED = {"skipped_rows.jsonl"}
# `datasets.load_dataset` names that read local files, as opposed to Hub dataset ids.
LOCAL_LOADERS = {
    "imagefolder",
    "audiofolder",
    "videofolder",
    "json",
    "csv",
    "parquet",
    "text",
    "arrow",
    "webdataset",
    "pandas",
    "sql",
    "xml",
}
# Written by the trainer into the output folder; shown on the card and pushed with it.
PICTURES = (
    ("Recall@K of the starting model and the fine-tuned model", "recall_at_k.png"),
    ("Training loss, learning rate and validation recall", "training_curves.png"),
)
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class HubAccessError(UserError):
    """The token is missing, rejected, read-only, or cannot write to the repo."""


class PushToHubError(UserError):
    """The upload failed; the message names the command that retries it."""


def check_hub_access(repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Fail fast, before training: the token authenticates and `repo_id` exists or can be created with write
    access. Returns the repo id. Raises HubAccessError (a ValueError) with what to do."""
    api = HfApi(token=token)
    try:
        identity = api.whoami()
    except LocalTokenNotFoundError:
        raise HubAccessError(
            f"Publishing to {repo_id} needs a Hugging Face token with write access and none was "
            "found. Run `hf auth login` (or set HF_TOKEN), then start again."
        ) from None
    except (HfHubHTTPError, OfflineModeIsEnabled, _TransportError) as error:
        raise HubAccessError(_redact(_access_problem(error, repo_id, api.endpoint), token)) from None
    if identity.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubAccessError(
            f"Your Hugging Face token ({identity.get('name')}) is read-only and cannot push to "
            f"{repo_id}. Create a write token at https://huggingface.co/settings/tokens and run "
            "`hf auth login --force` (or set HF_TOKEN to it)."
        )
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except (HfHubHTTPError, _TransportError) as error:
        raise HubAccessError(_redact(_access_problem(error, repo_id, api.endpoint), token)) from None
    logger.info(f"Hub access checked: {identity.get('name')} can push to {repo_id}.")
    return repo_id


def _access_problem(error: Exception, repo_id: str, endpoint: str) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return f"Cannot publish {repo_id}: HF_HUB_OFFLINE is set, so no request may reach the Hub. Unset it and retry."
    if status == 401:
        return (
            "The Hugging Face Hub rejected your token (401). Run `hf auth login --force` with a write token, "
            "or fix HF_TOKEN (it takes precedence over the stored login)."
        )
    if status == 403:
        return (
            f"Your token may not create or write to {repo_id} (403 Forbidden). Use a namespace you own, or a "
            f"token with write access to {repo_id.split('/')[0]}."
        )
    return f"Could not check access to {repo_id} on {endpoint}: {type(error).__name__}: {error}"


def write_model_card(output_dir: str, *, repo_id: str | None = None) -> str:
    """Render model_card_template.md from OUTPUT's own files into OUTPUT/README.md; returns the path."""
    files = _read_run_files(output_dir)
    config, results = files["training_config.json"], files["eval_results.json"]
    model_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    data_kind, dataset_ids, dataset_label = _data_source(config)
    arch = files["config.json"]
    family = FAMILIES.get(arch.get("model_type"), CLIP)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license="mit",
        base_model=_base_model(config),
        datasets=dataset_ids,
        model_name=model_id,
        tags=[family.name, "contrastive", "image-text-retrieval", "zero-shot-image-classification"] + ["clip_accel"],
        eval_results=_eval_results(
            results["test"], dataset_ids[0] if dataset_ids else data_kind, dataset_label, config["test_split"]
        ),
    )
    context = {
        "model_id": model_id,
        "load_path": repo_id or os.path.abspath(output_dir),
        "config": config,
        "results": results,
        "training": results["training"],
        "arch": arch,
        # The family's names and the embedding width (SigLIP has no projection: its towers' heads give it).
        "family": {
            "name": family.title,
            "doc": family.name,
            "model_class": family.model_class.__name__,
            "sigmoid": family.sigmoid,
        },
        "embedding_dim": embedding_size(arch),
        "data_kind": data_kind,
        "dataset_label": dataset_label,
        "results_table": _results_table(results, model_id),
        "nested_table": _nested_table(results, embedding_size(arch)),
        "warmup_steps": results["training"]["warmup_steps"],
        "epochs_run": results["training"]["epochs_run"],
        "versions": _framework_versions(),
        "pictures": [(caption, name) for caption, name in PICTURES if os.path.isfile(os.path.join(output_dir, name))],
    }
    with resources.as_file(_card_template()) as template_path:
        card = ModelCard.from_template(card_data, template_path=str(template_path), **context)
    path = os.path.join(output_dir, CARD_NAME)
    card.save(path)
    return path


def _card_template():
    """model_card_template.md: inside the installed package (setup.py copies it there), else at the top of the
    checkout the package runs from (an editable install, PYTHONPATH)."""
    packaged = resources.files("clip_accel") / CARD_TEMPLATE
    return packaged if packaged.is_file() else Path(__file__).resolve().parent.parent / CARD_TEMPLATE


def _read_run_files(output_dir: str) -> dict[str, dict | list]:
    files: dict[str, dict | list] = {}
    for name in ("eval_results.json", "training_config.json", "config.json"):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            with open(path) as handle:
                files[name] = json.load(handle)
        else:
            raise UserError(
                f"{output_dir} has no {name}: it is not a finished clip_accel output folder. Point at "
                "the --output_dir of a completed `clip-accel train` run."
            )
    return files


def _base_model(config: dict) -> str | None:
    """The starting checkpoint when it is a Hub id; None when trained from scratch or from a local folder."""
    name = config["model_name_or_path"].removeprefix(HUB_PREFIX)  # an open_clip repo on the Hub: ORG/NAME too
    if config.get("scratch_config") is not None or os.path.isdir(name) or not HUB_ID.fullmatch(name):
        return None
    return name


def _data_source(config: dict) -> tuple[str, list[str] | None, str]:
    """(kind, dataset ids for the metadata or None when there is no honest one, a short label). The label is
    --dataset_label when given; Hub metadata names only Hub datasets (local folders are not on the Hub)."""
    name, label = config.get("dataset_name"), config.get("dataset_label")
    # A --data_dir run on a catalogue written by the demo generator is the demo too: it leaves its marker file.
    data_dir = config.get("data_dir")
    if config.get("demo") or (data_dir and os.path.isfile(os.path.join(data_dir, DEMO_MARKER))):
        return "demo", None, label or "clip_accel demo catalogue (synthetic)"
    if name and name not in LOCAL_LOADERS and not os.path.exists(name):
        return "hub", [name], label or name
    if name:
        return "local", None, label or f"local files ({name})"
    return "folder", None, label or os.path.basename(os.path.normpath(data_dir))


def _eval_results(test: dict, dataset_type: str, dataset_name: str, split: str) -> list[EvalResult]:
    """Test-split recall@K both ways; metric types are the eval_results.json keys, so they map back one to one."""
    return [
        EvalResult(
            task_type="image-text-retrieval",
            task_name="Image-text retrieval",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=f"{direction}_R@{k}",
            metric_name=f"{label} R@{k}",
            metric_value=test[f"{direction}_R@{k}"],
        )
        for direction, label in (("image_to_text", "Image-to-text"), ("text_to_image", "Text-to-image"))
        for k in RECALL_KS
    ] + [
        EvalResult(
            task_type="zero-shot-image-classification",
            task_name="Zero-shot image classification",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=key,
            metric_name=f"Zero-shot top-{key[-1]} accuracy",
            metric_value=test[key],
        )
        for key in ("zero_shot_top1", "zero_shot_top5")
        if key in test
    ]


def _results_table(results: dict, model_id: str) -> str:
    """The fine-tuned test figures beside the starting model's on the same split (when it was evaluated)."""
    return format_results_table(with_starting_model(results, {f"{model_id} (this model)": results["test"]}))


def _nested_table(results: dict, width: int) -> str | None:
    """Test recall at the full size and each smaller one of a run trained with --matryoshka_dims (eval_results.json's
    "matryoshka" block); None for a run trained without."""
    nested = results["test"].get("matryoshka")
    if not nested:
        return None
    rows = {f"{width} (full)": results["test"], **nested}
    headers = ["Dimensions", *(title for title, _ in RECALL_COLUMNS)]
    return markdown_table(headers, [[size, *metric_cells(figures, RECALL_COLUMNS)] for size, figures in rows.items()])


def _framework_versions() -> dict[str, str]:
    """Versions where the card is rendered: the training environment when the trainer writes it."""
    versions = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "huggingface_hub"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # e.g. run from a checkout beside a partial environment
            continue
    return {**versions, "clip_accel": __version__}


def _redact(text: str, token: str | None = None) -> str:
    """Belt and braces: no message of ours may carry the token, whatever an error string contained."""
    secret = token or get_token()
    return text.replace(secret, "<token>") if secret else text


def retry_command(output_dir: str, repo_id: str, private: bool = False) -> str:
    return f"clip-accel push {shlex.quote(output_dir)} --hub_model_id {shlex.quote(repo_id)}" + (
        " --private" if private else ""
    )


def push_output_dir(output_dir: str, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload the finished output folder in one commit; returns the commit URL.

    One `create_commit`, not `upload_folder`: with hf_xet installed upload_folder may split a folder into several
    commits and retries a failing commit for ~20 s; one commit means a repo is either the old model or the new one.
    """
    _ensure_card(output_dir, repo_id)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(output_dir, name))
        for name in _files_to_push(output_dir)
    ]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=f"Upload model trained with clip_accel ({len(operations)} files)",
        )
    # Whatever failed (HTTP error, network, card validation), the user's next step is the same: retry the push.
    except Exception as error:
        raise PushToHubError(
            _redact(
                f"Uploading {output_dir} to the Hub repo {repo_id} failed: {type(error).__name__}: {error}\n\n"
                f"Nothing local was changed: the folder is complete. Retry the upload with:\n"
                f"    {retry_command(output_dir, repo_id, private)}",
                token,
            )
        ) from error
    logger.info(f"Pushed {len(operations)} files of {output_dir} to {repo_id}: {commit.commit_url}")
    return commit.commit_url


def _files_to_push(output_dir: str) -> list[str]:
    """Top-level files (open_clip's files too, once exported), a LoRA run's adapter/ and the exported onnx/: staging
    folders, tracker logs and checkpoints live in other sub-folders."""
    names = sorted(
        name
        for name in os.listdir(output_dir)
        if os.path.isfile(os.path.join(output_dir, name)) and not name.startswith(".") and name not in NOT_PUSHED
    )
    has_weights = "model.safetensors" in names or "model.safetensors.index.json" in names
    if not has_weights or "config.json" not in names:
        raise PushToHubError(
            f"{output_dir} holds no model (model.safetensors and config.json): point at the "
            "--output_dir of a finished `clip-accel train` run."
        )
    for folder in (ADAPTER_DIR, ONNX_FOLDER):  # a LoRA run's adapter; the ONNX towers of `clip-accel export`
        if os.path.isdir(os.path.join(output_dir, folder)):
            files = sorted(os.listdir(os.path.join(output_dir, folder)))
            names += [f"{folder}/{name}" for name in files if not name.startswith(".")]
    return names


def _ensure_card(output_dir: str, repo_id: str) -> None:
    """Write the card when it is missing, or when it is one of ours rendered for another name (e.g. before the
    repo id was known: its snippet would load the wrong thing). Any other card, edited or not, is kept."""
    path = os.path.join(output_dir, CARD_NAME)
    if os.path.isfile(path):
        card = ModelCard.load(path, ignore_metadata_errors=True)
        if card.data.model_name == repo_id or CARD_MARKER not in card.content:
            return
    logger.info(f"Writing the model card for {repo_id} into {path}.")
    write_model_card(output_dir, repo_id=repo_id)
