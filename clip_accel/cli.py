"""Every entry point: `clip-accel train | evaluate | push | reproduce | wise-ft | embed | search | index-shards | env`.

`scripts/*.py`, `python -m clip_accel` and the console scripts in pyproject.toml are one-line wrappers of these
functions. Each returns None, so a console script exits with status 0 on success (a console script hands the
function's return value to `sys.exit`); failures raise and exit non-zero.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import sys
import time
import traceback

import transformers
from accelerate import PartialState

from .checkpoint import list_checkpoints
from .config import METRIC_NAMES, REMOTE_RETRY_SECONDS, DataConfig, ModelConfig, TrainConfig, UserError
from .data.retry import Retrying
from .data.shards import index_shards
from .embedding import check_output_file, check_writable_file, embed, load_embeddings, save_embeddings
from .environment import format_report, report
from .evaluation import evaluate_folder, training_option
from .export import FORMATS, export_folder
from .hub import check_hub_access, push_output_dir, write_model_card
from .model import is_local_path
from .options import CommandParser, parse_config
from .outputs import write_outputs
from .preemption import PREEMPTED_EXIT, Preempted, name_the_checkpoint, watching_for_preemption
from .results import format_results_table
from .search import QueryEncoder, contact_sheet, format_hits, search
from .sweep import SweepOptions, run_sweep
from .trainer import TrainingResult, train
from .wise_ft import WiseFtOptions, wise_ft

logger = logging.getLogger(__name__)


USER_ERROR_GRACE_SECONDS = 5  # a process other than the main one waits this long before saying its user error


def command(name: str | None):
    """A command's entry point: logging set up first (`--log_level`), and a UserError printed as argparse prints a
    bad option, `clip-accel NAME: error: MESSAGE`, once per launch (by the main process; another says it only where
    the main process did not stop on it), with status 2 and no traceback (with --log_level debug, the traceback
    too). Any other exception is a bug and keeps its traceback."""
    prog = " ".join(filter(None, ("clip-accel", name)))

    def decorate(function):
        @functools.wraps(function)
        def entry(argv: list[str] | None = None) -> None:
            setup_logging(_log_level(sys.argv[1:] if argv is None else argv))
            try:
                function(argv)
            except UserError as error:
                message = f"{prog}: error: {error}\n"
                if not _launched_as_main_process():
                    # The main process stops on the same check and says it, and the launcher then ends this one
                    # (were it gone first, the launcher could end the main process before it spoke). Still here
                    # after the wait: the main process did not stop on it, so this one says it.
                    time.sleep(USER_ERROR_GRACE_SECONDS)
                    message = f"{prog}: error: (process {os.environ['RANK']}) {error}\n"
                if logging.getLogger("clip_accel").isEnabledFor(logging.DEBUG):
                    traceback.print_exc()
                sys.stderr.write(message)
                raise SystemExit(2) from None

        return entry

    return decorate


def _log_level(argv: list[str]) -> str:
    """--log_level as typed (the command's own parser checks it); a recipe's value is applied once it is read."""
    pre_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre_parser.add_argument("--log_level", default="info")
    level = pre_parser.parse_known_args(argv)[0].log_level
    return level if level in ("info", "debug") else "info"


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log_level",
        choices=("info", "debug"),
        default="info",
        help="debug: also the libraries' own lines, and a user error's traceback.",
    )


@command(None)
def main(argv: list[str] | None = None) -> None:
    """`clip-accel COMMAND [options]`; `clip-accel COMMAND --help` lists each command's options."""
    parser = CommandParser(prog="clip-accel", description="Fine-tune CLIP with Accelerate and publish it.")
    parser.add_argument(
        "command",
        choices=COMMANDS,
        help="train, evaluate, push, reproduce, wise-ft, embed, search, index-shards or env",
    )
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options")
    args = parser.parse_args(argv)
    COMMANDS[args.command](args.options)


@command("train")
def train_main(argv: list[str] | None = None) -> None:
    """`accelerate launch -m clip_accel train --config demo [--option value ...]` (or `scripts/train.py`)."""
    with watching_for_preemption():  # from the start: a preemption during start-up stops the run before its first step
        data_config, model_config, train_config = parse_config(argv)
        setup_logging(train_config.log_level)  # (a recipe's --log_level too)
        try:
            train_and_publish(data_config, model_config, train_config)
        except KeyboardInterrupt:
            if _launched_as_main_process():
                logger.error(_interrupted(train_config.output_dir, sys.argv[1:] if argv is None else argv))
            raise SystemExit(130) from None  # the shell's status for "ended by Ctrl-C"
        except Preempted as preempted:
            name_the_checkpoint(preempted)
            if _launched_as_main_process():
                logger.warning(_preempted(preempted))
            raise SystemExit(PREEMPTED_EXIT) from None


def _preempted(preempted: Preempted) -> str:
    if preempted.checkpoint is None:
        return (
            f"Preempted during start-up, before any checkpoint: exiting with status {PREEMPTED_EXIT}. The same launch "
            "starts from scratch (scripts/slurm/launch_node.sh requeues the job with --resume_from_checkpoint "
            "latest_if_any, which does)."
        )
    return (
        f"Preempted: checkpoint {preempted.checkpoint} (step {preempted.step}); exiting with status "
        f"{PREEMPTED_EXIT}. The same launch with --resume_from_checkpoint latest goes on from it "
        "(scripts/slurm/launch_node.sh requeues the job with --resume_from_checkpoint latest_if_any)."
    )


def _launched_as_main_process() -> bool:
    """Rank 0 by the launcher's RANK: for messages before an Accelerator exists or after it is gone."""
    return int(os.environ.get("RANK", "0")) == 0


def train_and_publish(data_config: DataConfig, model_config: ModelConfig, config: TrainConfig) -> TrainingResult:
    """What `clip-accel train` does: check Hub access (with --push_to_hub), train, then on the main process write
    the result files and the model card, and push."""
    # Fail fast, before any image is decoded. No Accelerator exists yet: the launcher's RANK says which process
    # is the main one (the others would only repeat the same check).
    if config.push_to_hub and _launched_as_main_process():
        check_hub_access(config.hub_model_id, private=config.hub_private)
    result = train(data_config, model_config, config)
    if PartialState().is_main_process:
        write_outputs(config.output_dir, result)
        write_model_card(config.output_dir, repo_id=config.hub_model_id)
        if config.push_to_hub:
            push_output_dir(config.output_dir, config.hub_model_id, private=config.hub_private)
    return result


@command("evaluate")
def evaluate_main(argv: list[str] | None = None) -> None:
    """`clip-accel evaluate --model_name_or_path OUTPUT --data_dir DIR --split test`"""
    parser = CommandParser(prog="clip-accel evaluate", description="Retrieval recall@K of any CLIP checkpoint.")
    _add_split_arguments(parser, "evaluate")
    parser.add_argument("--zero_shot_templates", default=None, help="JSON list of prompt templates ({c}).")
    parser.add_argument("--zero_shot_class_names", default=None, help="JSON object: class label -> words.")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument(
        "--per_device_eval_batch_size",
        type=int,
        default=None,
        help="Default: the value in the model folder's training_config.json, else 128. The same batch size gives "
        "bit-identical embeddings; another can flip near-ties.",
    )
    parser.add_argument(
        "--identical_captions_match",
        action="store_true",
        help="Count any identical caption as a correct match in the main figures (default: only the own pair; the "
        "other rule is always reported alongside).",
    )
    parser.add_argument("--output_file", default=None, help="Write the metrics here as JSON.")
    _add_log_level(parser)
    args = parser.parse_args(argv)
    data_config = _split_data_config(
        args,
        zero_shot_templates=args.zero_shot_templates,
        zero_shot_class_names=args.zero_shot_class_names,
        max_eval_samples=args.max_eval_samples,
    )
    metrics = evaluate_folder(
        args.model_name_or_path,
        data_config,
        batch_size=args.per_device_eval_batch_size,
        identical_captions_match=args.identical_captions_match,
    )
    if PartialState().is_main_process:
        logger.info("\n" + format_results_table({f"{args.model_name_or_path} ({args.split})": metrics}))
        if args.output_file:
            with open(args.output_file, "w") as handle:
                json.dump(metrics, handle, indent=2)


@command("push")
def push_main(argv: list[str] | None = None) -> None:
    """`clip-accel push OUTPUT --hub_model_id user/name [--private]`"""
    parser = CommandParser(
        prog="clip-accel push",
        description="Publish a finished training output folder to the Hugging Face Hub in one commit (writes the "
        "model card if missing).",
    )
    parser.add_argument("output_dir", help="The --output_dir of a finished `clip-accel train` run.")
    parser.add_argument("--hub_model_id", required=True, help="Repo to push to, e.g. your-name/clip-indo-fashion.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private (if it is new).")
    _add_log_level(parser)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.output_dir):  # (before the Hub is asked anything)
        parser.error(f"{args.output_dir} is not a folder: name the --output_dir of a finished `clip-accel train` run.")
    check_hub_access(args.hub_model_id, private=args.private)
    push_output_dir(args.output_dir, args.hub_model_id, private=args.private)


@command("export")
def export_main(argv: list[str] | None = None) -> None:
    """`clip-accel export OUTPUT --format open_clip [--format onnx --quantize]`"""
    parser = CommandParser(
        prog="clip-accel export",
        description="Write a trained model for other clients beside its transformers files: open_clip's files "
        "(open_clip_config.json, open_clip_model.safetensors) or ONNX towers for serving (OUTPUT/onnx/).",
    )
    parser.add_argument("output_dir", help="A trained model's folder (the --output_dir of `clip-accel train`).")
    parser.add_argument("--format", action="append", required=True, choices=FORMATS, help="Repeat for several.")
    parser.add_argument("--quantize", action="store_true", help="With onnx: also int8 copies (*_int8.onnx).")
    _add_log_level(parser)
    args = parser.parse_args(argv)
    for path in export_folder(args.output_dir, args.format, quantize=args.quantize):
        logger.info(f"Wrote {path}")


@command("reproduce")
def reproduce_main(argv: list[str] | None = None) -> None:
    """`clip-accel reproduce --data_dir /data/indo-fashion` (or `--smoke`): the reference table as RESULTS.md."""
    parser = CommandParser(
        prog="clip-accel reproduce",
        description="Run the reference table's rows and our proposal, then write OUTPUT/RESULTS.md.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="The Indo-fashion download (Kaggle layout).")
    source.add_argument("--smoke", action="store_true", help="The same sweep on the demo data with a tiny model.")
    parser.add_argument("--output_dir", default="outputs/reference_table", help="Every row and RESULTS.md go here.")
    parser.add_argument(
        "--accelerate_config",
        default=None,
        help="accelerate config file for every row (default: one process; bf16 on a GPU, the CPU with --smoke).",
    )
    parser.add_argument(
        "--siglip",
        action="store_true",
        help="Also run our SigLIP row (recipes/indo_fashion_siglip.yaml; marked as ours, not the reference's).",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="More training options for every row, after `--`.")
    _add_log_level(parser)
    args = parser.parse_args(argv)
    options = SweepOptions(
        output_dir=args.output_dir,
        data_dir=args.data_dir,
        smoke=args.smoke,
        siglip=args.siglip,
        accelerate_config=args.accelerate_config,
        extra=tuple(option for option in args.extra if option != "--"),
        invocation=shlex.join(["clip-accel", "reproduce", *(sys.argv[1:] if argv is None else argv)]),
    )
    run_sweep(options)


def _add_split_arguments(parser: argparse.ArgumentParser, verb: str):
    """The model and one split to read (`evaluate`, `embed`); returns the data-source group for more sources."""
    parser.add_argument("--model_name_or_path", required=True, help="Folder from save_pretrained or a Hub id.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="Folder in the Indo-fashion layout.")
    source.add_argument("--dataset_name", help="Any dataset datasets.load_dataset accepts.")
    source.add_argument("--demo", action="store_true", help="The embedded demo catalogue.")
    parser.add_argument("--split", default="test", help=f"Split to {verb} (default: test).")
    parser.add_argument("--data_files", default=None, help="With --dataset_name: local folder or glob.")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--label_column", default=None, help="Class-label column, for zero-shot accuracy.")
    parser.add_argument(
        "--caption_template",
        default=None,
        help="Compose captions from columns, e.g. '{product_title}, by {brand}' (default: the template the model "
        "folder was trained with, from its training_config.json, else the source's captions; '' for the source's "
        "captions).",
    )
    parser.add_argument("--cache_dir", default=None, help="Preprocessing cache (default: the datasets cache).")
    return source


def _split_data_config(args: argparse.Namespace, **options) -> DataConfig:
    """The DataConfig of `_add_split_arguments`' options (and `options`), `--split` as its test split; captions
    composed as the model was trained on them unless `--caption_template` says otherwise."""
    return DataConfig(
        caption_template=_caption_template(args.caption_template, args.model_name_or_path),
        data_dir=args.data_dir,
        dataset_name=args.dataset_name,
        demo=args.demo,
        data_files=args.data_files,
        image_column=args.image_column,
        caption_column=args.caption_column,
        label_column=args.label_column,
        cache_dir=args.cache_dir,
        test_split=args.split,
        **options,
    )


def _caption_template(given: str | None, model_folder: str) -> str | None:
    """--caption_template as given ('' for the source's own captions), else the one the model was trained with."""
    if given is not None:
        return given or None
    template = training_option(model_folder, "caption_template")
    if template:
        logger.info(f"Captions composed as in training: --caption_template {template!r}")
    return template


@command("wise-ft")
def wise_ft_main(argv: list[str] | None = None) -> None:
    """`clip-accel wise-ft OUTPUT [--weights 0 0.25 0.5 0.75 1] [--heldout_data_dir DIR]`"""
    parser = CommandParser(
        prog="clip-accel wise-ft",
        description="WiSE-FT: mix a fine-tuned model's weights with its starting model's, score each mix in-domain "
        "(and on a held-out dataset), write a table and a plot, and save the chosen mix.",
    )
    parser.add_argument("finetuned", help="The --output_dir of a finished `clip-accel train` run.")
    parser.add_argument("--base", default=None, help="Starting model (default: the run's --model_name_or_path).")
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="Mixing weights w in [0, 1]: (1 - w) start + w fine-tuned (default: 0 0.25 0.5 0.75 1).",
    )
    parser.add_argument("--output_dir", default=None, help="Default: FINETUNED/wise_ft.")
    parser.add_argument(
        "--save_weight", type=float, default=None, help="Save this mix (default: the best on the validation splits)."
    )
    metrics = [*METRIC_NAMES, "zero_shot_top1", "zero_shot_mean_per_class_recall"]
    parser.add_argument("--metric", default="mean_R@1", choices=metrics, help="In-domain figure to choose by.")
    parser.add_argument("--heldout_metric", default="mean_R@1", choices=metrics, help="Held-out figure to choose by.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=None, help="Default: the run's.")
    parser.add_argument("--cache_dir", default=None, help="Preprocessing cache (default: the datasets cache).")
    in_domain = parser.add_mutually_exclusive_group()
    in_domain.add_argument("--data_dir", help="In-domain data (default: the data the run trained on).")
    in_domain.add_argument("--dataset_name", help="In-domain data from datasets.load_dataset.")
    in_domain.add_argument("--demo", action="store_true", help="In-domain data: the embedded demo catalogue.")
    parser.add_argument(
        "--caption_template",
        default=None,
        help="In-domain captions from columns (default: the run's template; '' for the source's captions).",
    )
    heldout = parser.add_mutually_exclusive_group()
    heldout.add_argument("--heldout_data_dir", help="Held-out data in the Indo-fashion layout (general ability).")
    heldout.add_argument("--heldout_dataset_name", help="Held-out data from datasets.load_dataset.")
    for name in ("data_files", "image_column", "caption_column", "label_column"):
        parser.add_argument(
            f"--heldout_{name}", default={"image_column": "image", "caption_column": "caption"}.get(name)
        )
    parser.add_argument("--heldout_validation_split", default="validation")
    parser.add_argument("--heldout_test_split", default="test")
    _add_log_level(parser)
    args = parser.parse_args(argv)
    if not all(0 <= weight <= 1 for weight in args.weights) or not args.weights:
        parser.error(f"--weights must lie in [0, 1] (0: the starting model, 1: the fine-tuned one), got {args.weights}")
    if args.save_weight is not None and args.save_weight not in args.weights:
        parser.error(f"--save_weight {args.save_weight} is not among --weights {args.weights}: add it there.")
    if args.caption_template is not None and not (args.data_dir or args.dataset_name or args.demo):
        parser.error(
            "--caption_template goes with --data_dir, --dataset_name or --demo (the run's own data keeps its own)."
        )
    data = None
    if args.data_dir or args.dataset_name or args.demo:
        template = _caption_template(args.caption_template, args.finetuned)
        data = DataConfig(
            data_dir=args.data_dir, dataset_name=args.dataset_name, demo=args.demo, caption_template=template
        )
    heldout = None
    if args.heldout_data_dir or args.heldout_dataset_name:
        heldout = DataConfig(
            data_dir=args.heldout_data_dir,
            dataset_name=args.heldout_dataset_name,
            data_files=args.heldout_data_files,
            image_column=args.heldout_image_column,
            caption_column=args.heldout_caption_column,
            label_column=args.heldout_label_column,
            validation_split=args.heldout_validation_split,
            test_split=args.heldout_test_split,
        )
    options = WiseFtOptions(
        finetuned=args.finetuned,
        weights=tuple(sorted(set(args.weights))),
        output_dir=args.output_dir or os.path.join(args.finetuned, "wise_ft"),
        base=args.base,
        data=data,
        heldout=heldout,
        metric=args.metric,
        heldout_metric=args.heldout_metric,
        save_weight=args.save_weight,
        batch_size=args.per_device_eval_batch_size,
        cache_dir=args.cache_dir,
    )
    wise_ft(options)


@command("embed")
def embed_main(argv: list[str] | None = None) -> None:
    """`clip-accel embed --model_name_or_path OUTPUT --data_dir DIR --split test --output_file emb.parquet`"""
    parser = CommandParser(
        prog="clip-accel embed",
        description="Embed a split (or a folder of images) with a trained folder or Hub id, into a .parquet or "
        ".safetensors file with row ids; runs on every process of an accelerate launch.",
    )
    source = _add_split_arguments(parser, "embed")
    source.add_argument("--image_folder", help="A folder of image files (no captions): image embeddings only.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=None, help="Default: the run's, else 128.")
    parser.add_argument("--output_file", required=True, help="Where to write: NAME.parquet or NAME.safetensors.")
    parser.add_argument(
        "--dim",
        type=int,
        default=None,
        help="Write each vector's first DIM dimensions, renormalised (a model trained with --matryoshka_dims "
        "listing DIM: 128 of 512 takes 4x less memory to search); the file records DIM and `clip-accel search` "
        "cuts its queries alike. Default: the model's full size.",
    )
    _add_log_level(parser)
    args = parser.parse_args(argv)
    if args.dim is not None and args.dim < 1:
        parser.error(f"--dim must be at least 1, got {args.dim}")
    check_output_file(args.output_file)
    data = None
    if args.image_folder is None:
        data = _split_data_config(args)
    elif not os.path.isdir(args.image_folder):
        parser.error(f"--image_folder {args.image_folder!r} is not a folder.")
    embeddings = embed(
        args.model_name_or_path,
        data,
        image_folder=args.image_folder,
        cache_dir=args.cache_dir,
        batch_size=args.per_device_eval_batch_size,
        dim=args.dim,
    )
    if PartialState().is_main_process:
        save_embeddings(embeddings, args.output_file)
        dims = tuple(embeddings.image_embeds.shape)
        logger.info(f"Wrote {len(embeddings)} rows ({dims[1]}-dimensional embeddings) to {args.output_file}.")


@command("search")
def search_main(argv: list[str] | None = None) -> None:
    """`clip-accel search emb.parquet --text "red silk saree" [--image query.jpg] [--top_k 5]`"""
    parser = CommandParser(
        prog="clip-accel search",
        description="Top K rows of an embeddings file (clip-accel embed) for text or image queries, by cosine "
        "similarity, brute force on the device (exact; fine up to a few million rows).",
    )
    parser.add_argument("embeddings", help="A file written by `clip-accel embed`.")
    parser.add_argument("--text", action="append", default=[], help="A text query (repeat for more).")
    parser.add_argument("--image", action="append", default=[], help="An image file as the query (repeat).")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument(
        "--against",
        choices=("image", "text"),
        default="image",
        help="Search the rows' image embeddings (default) or their caption embeddings.",
    )
    parser.add_argument("--model_name_or_path", default=None, help="Default: the model the file was embedded with.")
    parser.add_argument("--contact_sheet", default=None, help="Also draw the hits into this PNG.")
    parser.add_argument("--output_file", default=None, help="Also write the hits here as JSON.")
    _add_log_level(parser)
    args = parser.parse_args(argv)
    if not args.text and not args.image:
        parser.error("give at least one query: --text '...' or --image FILE")
    if args.top_k < 1:
        parser.error(f"--top_k must be at least 1, got {args.top_k}")
    for path, option in ((args.contact_sheet, "--contact_sheet"), (args.output_file, "--output_file")):
        if path is not None:
            check_writable_file(path, option)
    embeddings = load_embeddings(args.embeddings)
    model = args.model_name_or_path or embeddings.model
    if not model:
        parser.error(f"{args.embeddings} does not name its model: pass --model_name_or_path")
    if not args.model_name_or_path and is_local_path(model) and not os.path.isdir(model):
        parser.error(
            f"{args.embeddings} was embedded with the model folder {model}, which no longer exists: name where it "
            "is now with --model_name_or_path FOLDER."
        )
    encoder = QueryEncoder(model)
    results = []
    if args.text:
        hits = search(embeddings, encoder.texts(args.text), args.top_k, args.against)
        results += list(zip(args.text, hits, strict=True))
    if args.image:
        hits = search(embeddings, encoder.images(args.image), args.top_k, args.against)
        results += list(zip(args.image, hits, strict=True))
    print("\n\n".join(format_hits(query, hits) for query, hits in results))
    if args.contact_sheet:
        contact_sheet(results, args.contact_sheet)
        logger.info(f"Contact sheet: {args.contact_sheet}")
    if args.output_file:
        with open(args.output_file, "w") as handle:
            json.dump([{"query": q, "hits": [vars(hit) for hit in hits]} for q, hits in results], handle, indent=2)


@command("index-shards")
def index_shards_main(argv: list[str] | None = None) -> None:
    """`clip-accel index-shards FOLDER_OR_URL [--output FILE]`"""
    parser = CommandParser(
        prog="clip-accel index-shards",
        description="Write a shard index (wids' JSON: each tar shard's rows) for every split of a folder of WebDataset "
        "tar shards, read from the tar headers alone (the images are skipped; Range requests when remote), so that "
        "--streaming starts without counting. Written beside the shards as SPLIT.shardindex.json (train, "
        "validation, test), where --streaming finds it. A shard's split is named by datasets' keywords in its "
        "path (dev-*.tar is validation, eval-*.tar test; docs/streaming.md); shards naming none are training "
        "shards where no shard names one, an error beside shards that do.",
    )
    parser.add_argument(
        "folder",
        help="A folder of tar shards (train-*.tar, validation-*.tar, ...; or img2dataset's), or a remote location of "
        "them: an s3://, gs://, hf:// folder or glob, or a brace pattern of http(s):// URLs.",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="Write the training split's index here instead (a folder you cannot write to, or remote shards); pass "
        "it as --shard_index.",
    )
    parser.add_argument(
        "--remote_retry_seconds",
        type=float,
        default=REMOTE_RETRY_SECONDS,
        help=f"How long a remote read that keeps failing in passing is retried (as in training; default "
        f"{REMOTE_RETRY_SECONDS:g}).",
    )
    _add_log_level(parser)
    args = parser.parse_args(argv)
    if args.remote_retry_seconds < 0:
        parser.error("--remote_retry_seconds must be 0 or more (0: no retry).")
    written = index_shards(args.folder, args.output, Retrying(args.remote_retry_seconds))
    for path, split, shards, rows in written:
        logger.info(f"{path}: {shards} {split} shards, {rows} rows")


@command("env")
def env_main(argv: list[str] | None = None) -> None:
    """`clip-accel env`: versions, devices, configs and caches for a bug report (environment.py)."""
    CommandParser(prog="clip-accel env", description=env_main.__doc__).parse_args(argv)
    print(format_report(report()))


def _interrupted(output_dir: str, argv: list[str]) -> str:
    """One line: where an interrupted run can be resumed from, and how."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return (
            "Interrupted before the first checkpoint (one is written at every epoch end and every "
            "--checkpointing_steps): there is nothing to resume; start the run again."
        )
    resume = shlex.join(["clip-accel", "train", *argv, "--resume_from_checkpoint", "latest"])
    return (
        f"Interrupted. Last checkpoint: {checkpoints[-1]}. Resume it with the same launch and "
        f"--resume_from_checkpoint latest: {resume}"
    )


COMMANDS = {
    "train": train_main,
    "evaluate": evaluate_main,
    "push": push_main,
    "export": export_main,
    "reproduce": reproduce_main,
    "wise-ft": wise_ft_main,
    "embed": embed_main,
    "search": search_main,
    "index-shards": index_shards_main,
    "env": env_main,
}


def setup_logging(level: str = "info") -> None:
    """One line per checkpoint and per evaluation at "info"; "debug" adds clip_accel's per-step lines, Accelerate's
    own lines (seven per checkpoint) and transformers' progress bars (writing and loading weights)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    for noisy in ("transformers", "datasets", "httpx", "httpx2", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    debug = level == "debug"
    logging.getLogger("clip_accel").setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.INFO if debug else logging.WARNING)
    if not debug:  # a bar inside the training bar at every save
        transformers.utils.logging.disable_progress_bar()
