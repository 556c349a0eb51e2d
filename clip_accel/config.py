"""Run configuration: three read-only dataclasses (data, model, training) parsed by `HfArgumentParser`.

A `--config recipe.yaml` supplies defaults and the command line overrides them (options.py), so a recipe is a
starting point, never a trap. Every check that can fail runs here, before any model or image is loaded.
"""

from __future__ import annotations

import os
import string
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Literal

RECALL_KS = (1, 5, 10)
REMOTE_RETRY_SECONDS = 120.0  # --remote_retry_seconds's default (data/retry.py)
METRIC_NAMES = (
    "mean_R@1",
    *(f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in RECALL_KS),
)


class UserError(ValueError):
    """Something the user gave or asked for cannot work (an option's value, a file, a folder, a split, a recipe):
    the message says what to change. `clip-accel` prints it as argparse prints a bad option, without a traceback,
    and exits with status 2; any other exception is a bug and keeps its traceback."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_writable_folder(folder: str, option: str, advice: str = "") -> None:
    """`folder` (an option's value) is a folder where this user can create a file, made if missing; else a
    UserError naming the option (and `advice`, else "name a folder this user can write")."""
    problem = None
    if os.path.exists(folder) and not os.path.isdir(folder):
        problem = "is a file, not a folder"
    else:
        try:
            os.makedirs(folder, exist_ok=True)
            descriptor, probe = tempfile.mkstemp(prefix=".clip_accel-write-test-", dir=folder)
            os.close(descriptor)
            os.remove(probe)
        except OSError as error:
            problem = f"cannot be written ({error.strerror or error})"
    if problem is not None:
        advice = advice or "name a folder this user can write (it is made if missing)"
        raise UserError(f"{option} {folder!r} {problem}: {advice}.")


def template_fields(template: str) -> tuple[str, ...]:
    """The column names a --caption_template places, in order of first use. Only plain `{column}` placeholders
    are accepted (no positions, attributes, indices, conversions or format specs); `{{` and `}}` are braces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise UserError(
            f"--caption_template {template!r}: {error}; write columns as {{column}}, braces as {{{{ }}}}."
        ) from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        _require(
            name.strip() and not name.isdigit() and not set(name) & set(".[]") and not spec and conversion is None,
            f"--caption_template {template!r}: {{{name}{'!' + conversion if conversion else ''}"
            f"{':' + spec if spec else ''}}} is not a column placeholder; use plain {{column}} names such as "
            "{product_title} or {brand}.",
        )
        if name not in names:
            names.append(name)
    _require(bool(names), f"--caption_template {template!r} names no column; e.g. '{{product_title}}, by {{brand}}'.")
    return tuple(names)


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder in the Indo-fashion Kaggle layout (train_data.json, val_data.json, test_data.json, "
            "images/). With --demo: where the demo catalogue is written (default: a cache folder)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Any dataset `datasets.load_dataset` accepts instead of --data_dir: a Hub id or a local "
            "folder/file type such as 'imagefolder', 'json', 'csv' or 'parquet' (with --data_files)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of --dataset_name."})
    data_files: str | None = field(
        default=None, metadata={"help": "Local folder or glob passed to load_dataset as data_dir/data_files."}
    )
    dataset_label: str | None = field(
        default=None,
        metadata={
            "help": "The dataset's name in the model card (e.g. 'Indo-fashion'). Default: the --data_dir folder's "
            "name, or --dataset_name."
        },
    )
    zero_shot_templates: str | None = field(
        default=None,
        metadata={
            "help": "JSON file: a list of zero-shot prompt templates with a {c} (CLIP_benchmark) or {label} "
            "placeholder. Default: product-photo templates for Indo-fashion-layout data, CLIP's generic ones else."
        },
    )
    zero_shot_class_names: str | None = field(
        default=None,
        metadata={
            "help": "JSON file: an object mapping class labels to the words used in the prompts (default: the "
            "label with underscores as spaces)."
        },
    )
    demo: bool = field(
        default=False,
        metadata={
            "help": "Train on the embedded synthetic fashion catalogue (written in the Indo-fashion layout on "
            "first use, then read through the real Indo-fashion loader)."
        },
    )
    caption_template: str | None = field(
        default=None,
        metadata={
            "help": "Compose each caption from the source's columns, e.g. '{product_title}, by {brand}': any field "
            "of the Indo-fashion JSON lines (product_title, brand, class_label, ...) or any column of a "
            "--dataset_name source (it then replaces --caption_column). Applied when the rows are read, for "
            "training and evaluation alike (the cache follows it); a null value is written as an empty string. "
            "Default: the title (product_title), or --caption_column."
        },
    )
    extra_caption_templates: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More captions for every training row, composed like --caption_template from the row's "
            "columns, e.g. 'a photo of a {class_label}' (FLYP's class prompts): each joins the row's captions, of "
            "which one is drawn per epoch; evaluation keeps the first caption only (a class prompt shared by a whole "
            "class would inflate image-to-text recall)."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    caption_column: str = field(
        default="caption",
        metadata={
            "help": "Caption column of --dataset_name, or a JSON column's field as COLUMN.FIELD (e.g. "
            "json.product_title in WebDataset shards)."
        },
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "Optional class-label column of --dataset_name (or COLUMN.FIELD, e.g. json.class_label)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str = field(
        default="validation", metadata={"help": "Split for early stopping ('val' in the Indo-fashion files)."}
    )
    test_split: str = field(default="test", metadata={"help": "Split for the final evaluation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N rows of the validation and test splits."}
    )
    preprocessing_num_workers: int = field(
        default=1, metadata={"help": "Processes for the one-off image decoding pass (datasets.map num_proc)."}
    )
    strict: bool = field(
        default=False,
        metadata={
            "help": "Stop at the first unusable row (naming file, line and reason) instead of "
            "skipping it and listing it in OUTPUT/skipped_rows.jsonl."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where preprocessed splits are cached (default: the datasets cache)."}
    )
    cache_format: Literal["uint8", "jpeg"] = field(
        default="uint8",
        metadata={
            "help": "uint8: the training split's pixels cached as they are (fastest to read: ~150 KB per 224 px "
            "image). jpeg: each resized crop re-encoded once at quality 95 (~16 KB per 224 px product photo) and "
            "decoded per batch: for catalogues whose uint8 cache would not fit the disk; decode in parallel with "
            "--dataloader_num_workers (BENCHMARKS.md section 2). Validation and test splits stay uint8, so the "
            "reported recall keeps CLIPProcessor's exact pixels. Not for SigLIP 2's patch sequences."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the training split of --dataset_name as a stream (datasets streaming: a Hub id; a local "
            "folder of WebDataset .tar shards named train-*.tar, validation-*.tar (or dev-*), test-*.tar (or eval-*), "
            "or img2dataset's (no split in any name: all training); "
            "remote shards at an http(s)://, s3://, gs:// or hf:// URL), decoded in the "
            "--dataloader_num_workers processes and never cached: for catalogues no disk holds. Every pair is seen "
            "once per pass of the stream; validation and test are read once and cached as usual (README, "
            "'Streaming')."
        },
    )
    epoch_rows: int | None = field(
        default=None,
        metadata={
            "help": "With --streaming: the training rows of one epoch (an epoch is this many rows' worth of "
            "batches, read from the start of its pass). Default: a pass's rows (each shard's rows are counted "
            "before training in any case: a pass's order is cut from them)."
        },
    )
    shard_index: str | None = field(
        default=None,
        metadata={
            "help": 'With --streaming: a shard index (wids\' JSON: {"wids_version": 1, "shardlist": [{"url", '
            '"nsamples"}]}) giving each training shard\'s rows, for shards whose folder you cannot write to. '
            "Default: SPLIT.shardindex.json beside the shards (clip-accel index-shards writes it), else img2dataset's "
            "*_stats.json, else each local shard's tar headers are read (not its images)."
        },
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={
            "help": "With --streaming: rows shuffled together. Each DataLoader worker reads its slot of the pass in "
            "windows of this many consecutive rows (the shards' order is drawn anew each pass) and hands each "
            "window's rows on in an order drawn from the seed, the pass and the window; memory: one window of "
            "encoded rows per worker. 0 keeps the slot's order."
        },
    )
    shard_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "With --streaming: a node-local folder (a local SSD) where each training shard is copied "
            "whole when first read (remote or on a shared file system), and read from after that; each worker "
            "fetches its next shards in the background. The node's processes share it (in DIR/HOSTNAME/: on "
            "shared storage each node keeps its own copies). Default: shards are read where they are, a remote "
            "one's bytes fetched every pass."
        },
    )
    shard_cache_gb: float = field(
        default=100.0,
        metadata={"help": "With --shard_cache_dir: the most it holds; the least recently used shards go first."},
    )
    remote_retry_seconds: float = field(
        default=REMOTE_RETRY_SECONDS,
        metadata={
            "help": "With remote shards: how long a read that keeps failing in passing (a refused, dropped or "
            "timed-out connection, HTTP 408/425/429/5xx) is retried, from its first failure, before its shard "
            "counts as unreachable: waits of up to 0.5 s, 1 s, 2 s, ... 30 s (random, and at least the server's "
            "Retry-After); a read that makes progress starts again. 0: no retry. A missing or forbidden shard "
            "(404, 403) is unreachable at once."
        },
    )
    max_unreachable_shards: int = field(
        default=0,
        metadata={
            "help": "With --streaming: how many shards a process may meet unreachable (their retries spent, or "
            "missing) and skip, their rows counted and listed in skipped_rows.jsonl, before the run stops. "
            "Default 0: the first one stops the run, naming it. An evaluation split read whole counts alike."
        },
    )
    augment: bool = field(
        default=False,
        metadata={
            "help": "Augment training images: the training split is cached at 8/7 of the model's resolution "
            "(256 for 224) and each sample gets a random resized crop on the device, seeded by step (a resumed "
            "run sees the same crops). Evaluation keeps CLIPProcessor's exact centre crop."
        },
    )
    augment_scale: list[float] = field(
        default_factory=lambda: [0.9, 1.0],
        metadata={
            "help": "With --augment: the crop's area as a fraction of the cached image, MIN MAX (open_clip's "
            "default 0.9 1.0)."
        },
    )
    augment_flip: bool = field(
        default=False, metadata={"help": "With --augment: also flip half the training images left-right."}
    )

    def __post_init__(self) -> None:
        sources = sum([self.data_dir is not None and not self.demo, self.dataset_name is not None, self.demo])
        _require(
            sources == 1,
            "Choose exactly one data source: --data_dir DIR (Indo-fashion layout), "
            "--dataset_name NAME (anything datasets can load), or --demo.",
        )
        if self.data_dir is not None and not self.demo:
            _require(
                os.path.isdir(self.data_dir),
                f"--data_dir {self.data_dir!r} is not a folder. Point it at the "
                "unpacked Indo-fashion download (the folder with train_data.json).",
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"--{name} must be at least 1 (or left unset), got {value}.")
        _require(self.preprocessing_num_workers >= 1, "--preprocessing_num_workers must be at least 1.")
        _require(self.cache_format in ("uint8", "jpeg"), f"--cache_format {self.cache_format!r}: use uint8 or jpeg.")
        for template in [
            *([self.caption_template] if self.caption_template is not None else []),
            *self.extra_caption_templates,
        ]:
            template_fields(template)
        if self.streaming:
            _require(
                self.dataset_name is not None,
                "--streaming reads --dataset_name (a Hub id, or a folder of WebDataset .tar shards); an Indo-fashion "
                "folder or the demo is cached instead: drop --streaming, or write it as shards "
                "(clip_accel.data.write_webdataset_shards).",
            )
            _require(
                self.max_train_samples is None,
                "--max_train_samples takes the first rows of a cached split; with --streaming set --epoch_rows.",
            )
            _require(self.cache_format == "uint8", "--streaming caches no training images: drop --cache_format.")
        else:
            _require(
                self.epoch_rows is None
                and self.shuffle_buffer == 1000
                and self.shard_index is None
                and self.shard_cache_dir is None
                and self.remote_retry_seconds == REMOTE_RETRY_SECONDS
                and self.max_unreachable_shards == 0,
                "--epoch_rows, --shuffle_buffer, --shard_index, --shard_cache_dir, --remote_retry_seconds and "
                "--max_unreachable_shards shape a stream: add --streaming (a cached split is shuffled whole each "
                "epoch).",
            )
        _require(
            self.streaming or "://" not in (self.dataset_name or ""),
            f"--dataset_name {self.dataset_name!r} is a URL: remote tar shards (http(s)://, s3://, gs://, hf://) "
            "are read with --streaming.",
        )
        _require(
            self.shard_index is None or os.path.isfile(self.shard_index),
            f"--shard_index {self.shard_index!r} is not a file: write one with `clip-accel index-shards FOLDER`.",
        )
        _require(
            self.epoch_rows is None or self.epoch_rows >= 1, f"--epoch_rows must be at least 1, got {self.epoch_rows}."
        )
        _require(self.shuffle_buffer >= 0, f"--shuffle_buffer must be 0 or more, got {self.shuffle_buffer}.")
        _require(self.shard_cache_gb > 0, f"--shard_cache_gb must be more than 0, got {self.shard_cache_gb}.")
        _require(
            self.remote_retry_seconds >= 0,
            f"--remote_retry_seconds must be 0 or more (0: no retry), got {self.remote_retry_seconds}.",
        )
        _require(
            self.max_unreachable_shards >= 0,
            f"--max_unreachable_shards must be 0 or more, got {self.max_unreachable_shards}.",
        )
        scale = list(self.augment_scale)
        _require(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            f"--augment_scale takes MIN MAX with 0 < MIN <= MAX <= 1 (e.g. 0.9 1.0), got {scale}.",
        )
        _require(
            self.augment or (scale == [0.9, 1.0] and not self.augment_flip),
            "--augment_scale and --augment_flip shape the training augmentation: add --augment to turn it on.",
        )


@dataclass(frozen=True)
class ModelConfig:
    model_name_or_path: str = field(
        default="openai/clip-vit-base-patch32",
        metadata={
            "help": "CLIP checkpoint to start from: a Hub id, a folder written by save_pretrained, or an open_clip "
            "model (a ViT CLIP, converted to CLIPModel once and cached): a folder open_clip wrote "
            "(open_clip_config.json and its weights), hf-hub:ORG/NAME, or a checkpoint file with --open_clip_model."
        },
    )
    open_clip_model: str | None = field(
        default=None,
        metadata={
            "help": "The open_clip architecture (e.g. ViT-B-32, one of open_clip's model_configs) of the checkpoint "
            "file open_clip's training wrote that --model_name_or_path names (e.g. logs/run/checkpoints/epoch_32.pt)."
        },
    )
    scratch_config: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch instead: a bundled preset name (e.g. 'clip-tiny') or a CLIPConfig JSON "
            "file. The tokenizer is then built offline from the training captions."
        },
    )
    freeze: Literal["none", "vision_layers", "backbones"] = field(
        default="none",
        metadata={
            "help": "none: train everything. vision_layers: freeze the vision embeddings and the first "
            "--freeze_vision_layers encoder layers. backbones: freeze both towers except the "
            "projections, final layer norms and logit_scale."
        },
    )
    freeze_vision_layers: int = field(default=6, metadata={"help": "Layers frozen by --freeze vision_layers."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each transformer layer's activations in the backward instead of keeping them "
            "(non-reentrant): less memory for a bigger batch, about one more forward of compute. The gradient "
            "is unchanged."
        },
    )
    text_positions: int = field(
        default=0,
        metadata={
            "help": "CLIP only: stretch the text tower's learned positions to N, Long-CLIP's way (the first 20 "
            "kept, the rest interpolated: 248 reads 4x longer captions than 77), so captions up to N tokens are "
            "not truncated; 0: off. The new positions start untrained: fine-tune on long captions to use them. "
            "A model already at N is left as is; from --scratch_config the fresh tower simply gets N."
        },
    )

    lora_rank: int = field(
        default=0,
        metadata={
            "help": "Train LoRA adapters of this rank instead of the whole model (0: off; 8 or 16 are common). "
            "Needs peft. The output folder holds the merged plain CLIPModel, OUTPUT/adapter/ the adapter alone."
        },
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha: the adapters are scaled by alpha/rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapters' input (0: none)."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,out_proj",
        metadata={
            "help": "Comma list of the linear layers that get adapters, in both towers (default: every attention "
            "projection; add fc1,fc2 for the MLPs)."
        },
    )

    def __post_init__(self) -> None:
        _require(self.lora_rank >= 0, f"--lora_rank must be 0 (off) or more, got {self.lora_rank}.")
        _require(0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_rank:
            _require(self.lora_alpha > 0, f"--lora_alpha must be positive, got {self.lora_alpha}.")
            _require(bool(self.lora_targets), "--lora_target_modules names no layer (e.g. q_proj,v_proj).")
            _require(
                self.freeze == "none",
                f"--lora_rank trains only the adapters (everything else is frozen): drop --freeze {self.freeze}.",
            )
            _require(
                self.scratch_config is None,
                "--lora_rank adapts a pretrained model: drop --scratch_config, or train from scratch without LoRA.",
            )
        _require(
            not (self.open_clip_model and self.scratch_config),
            "--open_clip_model names the architecture of the checkpoint file to start from: drop --scratch_config.",
        )
        _require(
            self.freeze in ("none", "vision_layers", "backbones"),
            f"--freeze {self.freeze!r} is not a freezing strategy; use none, vision_layers or backbones.",
        )
        _require(self.freeze_vision_layers >= 0, "--freeze_vision_layers must be 0 or more.")
        _require(self.text_positions >= 0, f"--text_positions must be 0 (off) or more, got {self.text_positions}.")

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.lora_target_modules.split(",") if name.strip())


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = field(default="outputs/clip-finetuned", metadata={"help": "Where the model and results go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a model."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for weights, shuffling and everything else random."})
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs over the training split."})
    max_steps: int = field(default=0, metadata={"help": "If > 0, stop after this many optimizer steps instead."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Pairs per process per micro-batch."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Pairs per process when embedding."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    accumulation: Literal["exact", "plain"] = field(
        default="exact",
        metadata={
            "help": "exact: the loss sees all accumulated micro-batches as one contrastive batch (one extra "
            "forward per micro-batch). plain: ordinary accumulation (mean gradient of the micro-batches), "
            "each micro-batch only sees its own negatives."
        },
    )
    local_loss: bool = field(
        default=True,
        metadata={
            "help": "With more than one process, score only this process's rows against the global batch's "
            "columns: the same gradient, logits memory O(B x N*B) instead of O((N*B)^2), one reduce-scatter in "
            "the backward. --no_local_loss computes the whole (N*B)^2 loss on every process (no communication "
            "in the backward). No effect on one process."
        },
    )
    caption_positives: Literal["identical", "own"] = field(
        default="identical",
        metadata={
            "help": "identical: pairs whose captions are the same text (the same token ids, after the tokenizer's "
            "lowercasing and truncation) are positives of each other in the loss "
            "(a catalogue's repeated titles are not pushed apart; CLIP: cross-entropy against the positives "
            "weighted uniformly, SigLIP: each such pair labelled +1), across processes and accumulated "
            "micro-batches. With all captions distinct it is exactly the usual loss. own: a pair's only positive "
            "is itself (the usual CLIP/SigLIP loss, as open_clip and run_clip.py train)."
        },
    )
    negative_hardness: float = field(
        default=0.0,
        metadata={
            "help": "Weight each in-batch negative by exp(alpha x its cosine similarity) inside CLIP's softmax "
            "(HN-NCE; sentence-transformers' hardness_strength): the negatives nearest a row count most. 0: off; "
            "Lan et al. used 9. Exact across processes and accumulated micro-batches. Not for SigLIP (no softmax)."
        },
    )
    hard_negative_batches: int = field(
        default=0,
        metadata={
            "help": "K >= 2 puts each training row in a batch with its K - 1 nearest neighbours (image to text, "
            "mined with the starting model before training): the near duplicates a catalogue's hard cases are "
            "(sentence-transformers' mine_hard_negatives, as batches). K must divide the batch of all processes. "
            "0: off (batches are a seeded shuffle). Not with --streaming."
        },
    )
    hard_negative_refresh: int = field(
        default=0,
        metadata={
            "help": "With --hard_negative_batches: mine the neighbours again with the model being trained at the "
            "start of every N-th epoch (epochs N+1, 2N+1, ...; costs one embedding pass of the training split "
            "each time). 0: the starting model's neighbours for the whole run."
        },
    )
    hard_negative_threshold: float = field(
        default=0.95,
        metadata={
            "help": "With --hard_negative_batches: a row j is no neighbour of row i when image i scores j's caption "
            "above this fraction of its own caption's score (likely a false negative: NV-Retriever's "
            "TopK-PercPos, 0.95); rows with row i's very caption never are."
        },
    )
    matryoshka_dims: str | None = field(
        default=None,
        metadata={
            "help": "Nested embedding sizes, e.g. 512,256,128,64 (Matryoshka, arXiv 2205.13147; sentence-transformers' "
            "MatryoshkaLoss): the loss is summed over the full size and each size listed, each on the first dims of "
            "the embeddings renormalised, so the leading dims alone retrieve well. Strictly decreasing, each at most "
            "the model's embedding size; the full size is always trained, listing it is optional (unlike "
            "sentence-transformers). The logged loss is the sum. Evaluation also reports recall at each smaller size, "
            "and `clip-accel embed --dim` writes them. Exact across processes and accumulated micro-batches."
        },
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    layer_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise learning-rate decay D in (0, 1] (timm's, per tower): the embeddings are id 0, "
            "encoder layer i id i + 1, the final norms, heads, projections and logit scale id L + 1; id k trains "
            "at lr x D^(L + 1 - k). 1 turns it off; FT-CLIP used 0.6 for ViT-B/16 (optim.py)."
        },
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Weight EMA in [0, 1) (0: off; e.g. 0.9998, as FT-CLIP): a float32 moving average of the "
            "trainable parameters, updated after every applied optimizer step, in every checkpoint (ema.py)."
        },
    )
    ema_warmup: bool = field(
        default=False,
        metadata={"help": "The EMA's decay warms up as timm's ModelEmaV3: min(decay, 1 - (1 + t)^(-2/3))."},
    )
    ema_eval: bool = field(
        default=True,
        metadata={
            "help": "With --ema_decay: evaluate, early-stop on and save the EMA weights (the output folder then "
            "holds them, and the card says so); false evaluates and saves the trained weights, the EMA only kept."
        },
    )
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (never applied to biases, norms and logit_scale)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (0.98 as in the CLIP paper)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "Schedule after warmup, sized in optimizer steps."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup in optimizer steps (wins over ratio)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of all optimizer steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 turns clipping off."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Overrides the accelerate config's mixed precision when given."}
    )
    eval_steps: int = field(
        default=0, metadata={"help": "Evaluate every N optimizer steps; 0 evaluates at the end of each epoch."}
    )
    early_stopping_metric: str = field(
        default="mean_R@1", metadata={"help": f"Validation metric that picks the best model: one of {METRIC_NAMES}."}
    )
    early_stopping_patience: int = field(
        default=3, metadata={"help": "Stop after this many evaluations without improvement; 0 never stops early."}
    )
    early_stopping_min_delta: float = field(
        default=0.0, metadata={"help": "An improvement smaller than this does not count."}
    )
    identical_captions_match: bool = field(
        default=False,
        metadata={
            "help": "Count any identical caption as a correct match in the main figures and for early "
            "stopping. Default: only the own pair, as the reference and open_clip count; the other "
            "rule is always reported alongside in eval_results.json."
        },
    )
    eval_initial_model: bool = field(
        default=True,
        metadata={"help": "Evaluate the starting model on the test split first (the zero-shot row of the table)."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss and learning rate every N optimizer steps."})
    log_level: Literal["info", "debug"] = field(
        default="info",
        metadata={
            "help": "info: one line per checkpoint and per evaluation, and one progress bar where a terminal is "
            "attached (plain per-logging-step lines where not). debug: also Accelerate's and transformers' own "
            "lines and bars, and every logging step's line."
        },
    )
    report_to: str = field(
        default="none", metadata={"help": "Trackers for accelerate: 'none', 'all', or a comma list (tensorboard, ...)."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds a process waits for the others (process-group timeout). The first run decodes every "
            "image while the other processes wait: raise it for large datasets on few cores."
        },
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "Compile the model with torch.compile (inductor) through Accelerate."}
    )
    tf32: bool = field(
        default=True,
        metadata={
            "help": "On CUDA, float32 matrix products (the loss's logits, anything outside autocast) use TF32 "
            "tensor cores. --no_tf32 keeps them in full float32. No effect on CPU."
        },
    )
    checkpointing_steps: int = field(
        default=0,
        metadata={
            "help": "Also checkpoint every N optimizer steps (checkpoints are always written at the "
            "end of each epoch), into OUTPUT/checkpoints/."
        },
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep only the newest K checkpoints (0 keeps all)."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'latest' (newest in OUTPUT/checkpoints), 'latest_if_any' (the same, or start from scratch, "
            "saying so, where there is none yet: a requeued SLURM job) or a checkpoint folder to resume."
        },
    )
    max_nonfinite_steps: int = field(
        default=25,
        metadata={
            "help": "Stop after this many optimizer steps in a row with non-finite loss/gradients "
            "(each one is skipped on the device, never applied; counted at the next log or checkpoint)."
        },
    )
    push_to_hub: bool = field(
        default=False,
        metadata={
            "help": "Publish the output folder to the Hugging Face Hub at the end (one commit). "
            "Access is checked before training starts."
        },
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo to push to, e.g. 'you/clip-indo-fashion'."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self) -> None:
        for name in (
            "num_train_epochs",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "max_nonfinite_steps",
            "ddp_timeout",
        ):
            _require(getattr(self, name) >= 1, f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in (
            "max_steps",
            "warmup_steps",
            "eval_steps",
            "early_stopping_patience",
            "dataloader_num_workers",
            "checkpointing_steps",
            "save_total_limit",
            "hard_negative_refresh",
        ):
            _require(getattr(self, name) >= 0, f"--{name} must be 0 or more, got {getattr(self, name)}.")
        _require(
            self.negative_hardness >= 0, f"--negative_hardness must be 0 (off) or more, got {self.negative_hardness}."
        )
        parse_nested_sizes(self.matryoshka_dims)  # a bad list fails here, before anything is loaded
        _require(
            self.hard_negative_batches == 0 or self.hard_negative_batches >= 2,
            f"--hard_negative_batches must be 0 (off) or a group size of at least 2, got {self.hard_negative_batches}.",
        )
        _require(
            self.hard_negative_refresh == 0 or self.hard_negative_batches,
            f"--hard_negative_refresh {self.hard_negative_refresh} re-mines --hard_negative_batches' neighbours: "
            "set --hard_negative_batches K too, or drop it.",
        )
        _require(
            0 < self.hard_negative_threshold <= 1,
            f"--hard_negative_threshold must be in (0, 1] (a fraction of the own pair's score), got "
            f"{self.hard_negative_threshold}.",
        )
        _require(
            self.caption_positives in ("identical", "own"),
            f"--caption_positives {self.caption_positives!r}: use identical or own.",
        )
        _require(self.learning_rate > 0, f"--learning_rate must be positive, got {self.learning_rate}.")
        _require(0 < self.layer_decay <= 1, f"--layer_decay must be in (0, 1] (1: off), got {self.layer_decay}.")
        _require(0 <= self.ema_decay < 1, f"--ema_decay must be in [0, 1) (0: off), got {self.ema_decay}.")
        _require(0.0 <= self.warmup_ratio < 1.0, f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        _require(self.max_grad_norm >= 0, "--max_grad_norm must be 0 (off) or positive.")
        _require(self.weight_decay >= 0, "--weight_decay must be 0 or positive.")
        _require(
            not self.push_to_hub or bool(self.hub_model_id),
            "--push_to_hub needs --hub_model_id (e.g. --hub_model_id your-name/clip-indo-fashion).",
        )
        _require(
            self.early_stopping_metric in METRIC_NAMES,
            f"--early_stopping_metric {self.early_stopping_metric!r} is not a metric; use one of {METRIC_NAMES}.",
        )

    def global_batch_size(self, num_processes: int) -> int:
        """Pairs per optimizer step: per-device batch x processes x accumulated micro-batches."""
        return self.per_device_train_batch_size * num_processes * self.gradient_accumulation_steps

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup in optimizer steps: explicit --warmup_steps win over --warmup_ratio."""
        return self.warmup_steps or int(total_steps * self.warmup_ratio)

    @property
    def matryoshka_sizes(self) -> tuple[int, ...]:
        """--matryoshka_dims as sizes, largest first; () without it."""
        return parse_nested_sizes(self.matryoshka_dims)

    @property
    def report_to_list(self) -> list[str] | str | None:
        if self.report_to == "none":
            return None
        if self.report_to == "all":
            return "all"
        return [name.strip() for name in self.report_to.split(",") if name.strip()]


def parse_nested_sizes(text: str | int | None) -> tuple[int, ...]:
    """`512,256,128` -> (512, 256, 128): positive and strictly decreasing (a recipe's single `128` is an int)."""
    if text is None or str(text).strip() == "":
        return ()
    try:
        sizes = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        sizes = ()
    _require(
        bool(sizes) and min(sizes) >= 1 and list(sizes) == sorted(set(sizes), reverse=True),
        f"--matryoshka_dims {text!r}: give embedding sizes as positive integers separated by commas, largest "
        "first and strictly decreasing, e.g. 512,256,128,64.",
    )
    return sizes


CONFIG_CLASSES = (DataConfig, ModelConfig, TrainConfig)


def config_to_dict(*configs) -> dict:
    """Flat dict of every option, for logging, trackers and the saved training config."""
    merged: dict = {}
    for config in configs:
        merged.update(asdict(config))
    return merged
