"""A run's start: the Accelerator, every check that can fail (before the first image is decoded where it can), the
data, the model, the optimizer and schedule, the checkpoint manager — gathered in `Run`, what the loop reads."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

from .augment import Augmenter, training_cache_size
from .checkpoint import CheckpointManager, resume_settings
from .config import RECALL_KS, DataConfig, ModelConfig, TrainConfig, UserError, check_writable_folder, config_to_dict
from .data import (
    NeighbourSampler,
    build_pair_datasets,
    check_strict,
    load_raw_splits,
    make_dataloader,
    training_captions,
    training_data,
    write_skip_report,
)
from .early_stopping import EarlyStopping
from .ema import WeightEma
from .evaluation import dataset_prompts, split_captions
from .launch import (
    check_checkpoint_storage,
    check_fsdp_layers,
    check_launch,
    check_streaming_launch,
    check_supported_launch,
    data_prepared_per_node,
    storage_is_shared,
)
from .lora import add_lora
from .loss import LOSSES, nested_loss
from .mining import TrainingNeighbours
from .model import (
    CLIP,
    ContrastiveModel,
    PixelNormalizer,
    embedding_size,
    enable_gradient_checkpointing,
    family_of,
    freeze_parameters,
    image_layout,
    load_model_and_processor,
    text_length,
    unwrap,
)
from .optim import build_optimizer, build_scheduler, log_parameter_groups
from .step import StepContext, use_tf32
from .text_positions import long_clip_positions
from .zero_shot import Prompts

logger = get_logger(__name__)


@dataclass
class Run:
    """Everything the loop needs, built once by `prepare_run()`."""

    config: TrainConfig
    step_context: StepContext
    processor: object
    train_data: object  # (data.training_data: a cached split's or a stream's, the same to the loop)
    validation_loader: object
    test_loader: object
    total_steps: int
    steps_per_epoch: int
    pair_counts: dict  # usable pairs per role
    shared_train_captions: int | None  # training pairs whose caption another has (None for a stream: not counted)
    labels: dict  # class label of every usable pair, per evaluation role (for zero-shot accuracy)
    captions: dict  # caption of every usable pair, per evaluation role (for the identical-caption figures)
    texts: dict  # per evaluation role, its captions, each distinct one embedded once (SplitCaptions)
    skipped: dict  # rows skipped per role (main process)
    truncation: dict  # captions cut at the text length per role (`CaptionTruncation`; a stream's: None until its end)
    resolved_config: dict  # every option, flat
    prompts: Prompts  # how zero-shot classification words the classes
    augmenter: Augmenter | None  # random crops of the training images (--augment), else None
    early_stopping: EarlyStopping
    checkpoints: CheckpointManager  # saves and restores every resumable piece above

    @property
    def accelerator(self) -> Accelerator:
        return self.step_context.accelerator

    @property
    def model(self) -> torch.nn.Module:
        return self.step_context.model


def prepare_run(data_config: DataConfig, model_config: ModelConfig, config: TrainConfig) -> Run:
    """Accelerator, data, model, optimizer and schedule; every check that can fail runs before the first step."""
    check_supported_launch()
    check_writable_folder(config.output_dir, "--output_dir")  # (before any image is decoded: seconds, not a pass)
    prompts = dataset_prompts(data_config)  # a bad prompt file fails before anything is loaded
    accelerator = _accelerator(config)
    set_seed(config.seed)
    check_launch(accelerator)
    _check_lora(accelerator, model_config, config)
    check_streaming_launch(accelerator, data_config)
    _check_hard_negative_batches(accelerator, data_config, config)
    use_tf32(accelerator.device, config.tf32)
    _place_checkpoints(accelerator, config.output_dir)
    configs = (data_config, model_config, config)
    checkpoints = CheckpointManager(accelerator, config.output_dir, config.save_total_limit)
    resuming = checkpoints.resolve(config.resume_from_checkpoint, resume_settings(configs, accelerator.num_processes))
    if not resuming:
        _check_output_dir(config)
    _compute_fsdp2_like_ddp(accelerator)
    model, processor, pairs, skipped = _load_model_and_data(accelerator, data_config, model_config, config)
    batch, workers = config.per_device_train_batch_size, config.dataloader_num_workers
    train_data = None  # (under --hard_negative_batches, made once the model is prepared: its sampler mines with it)
    if not config.hard_negative_batches:  # (prepared first, as ever: checkpoints keep its sampler as the first)
        train_data = training_data(accelerator, pairs["train"], batch, workers, config.output_dir, resuming is not None)
    loading = {"num_workers": config.dataloader_num_workers, "device": accelerator.device}
    loaders = [
        make_dataloader(pairs[role], config.per_device_eval_batch_size, train=False, **loading)
        for role in ("validation", "test")
    ]
    optimizer = build_optimizer(model, config)
    log_parameter_groups(optimizer, config)
    model, optimizer, validation_loader, test_loader = accelerator.prepare(model, optimizer, *loaders)
    normalizer = PixelNormalizer(processor.image_processor.image_mean, processor.image_processor.image_std)
    normalizer = normalizer.to(accelerator.device)
    neighbours = _neighbour_sampler(accelerator, model, pairs["train"], normalizer, config)
    if train_data is None:
        train_data = training_data(
            accelerator, pairs["train"], batch, workers, config.output_dir, resuming is not None, neighbours
        )
    steps_per_epoch = math.ceil(len(train_data) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or config.num_train_epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, config, total_steps)
    shared = train_data.shared_captions
    _log_startup(accelerator, config, total_steps, pairs, shared)
    _log_truncation(pairs, unwrap(accelerator, model).clip.config)
    resolved_config = config_to_dict(*configs)
    # Trackers take numbers, strings and booleans as hyperparameters: None and lists (--augment_scale) as text.
    tracked = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in resolved_config.items()}
    accelerator.init_trackers("clip_accel", config=tracked)
    family = unwrap(accelerator, model).family
    ema = _weight_ema(accelerator, model, config)
    early_stopping = EarlyStopping(
        config.early_stopping_metric, config.early_stopping_patience, config.early_stopping_min_delta
    )
    settings = resume_settings(
        configs,
        accelerator.num_processes,
        unwrap(accelerator, model).clip.config.to_dict(),
        pairs["train"].pairs_per_epoch,
        train_data.identity(),
    )
    checkpoints.track(
        settings, schedule=scheduler, early_stopping=early_stopping, data=train_data, ema=ema, order=neighbours
    )
    step_context = StepContext(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        normalizer=normalizer,
        max_grad_norm=config.max_grad_norm,
        local_loss=config.local_loss,
        loss=_loss(family, config),
        max_logit_scale=family.max_logit_scale,
        caption_positives=config.caption_positives,
        ema=ema,
    )
    return Run(
        config=config,
        step_context=step_context,
        processor=processor,
        train_data=train_data,
        validation_loader=validation_loader,
        test_loader=test_loader,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        pair_counts={role: pairs[role].pairs_per_epoch for role in pairs},
        shared_train_captions=shared,
        labels={role: pairs[role].column("label") for role in ("validation", "test")},
        captions={role: pairs[role].column("caption") for role in ("validation", "test")},
        texts={
            role: split_captions(accelerator, pairs[role], config.per_device_eval_batch_size)
            for role in ("validation", "test")
        },
        skipped=skipped,
        truncation={role: pairs[role].truncation for role in pairs},
        resolved_config=resolved_config,
        prompts=prompts,
        augmenter=_augmenter(data_config, image_layout(unwrap(accelerator, model).clip, processor).size, config.seed),
        early_stopping=early_stopping,
        checkpoints=checkpoints,
    )


def _accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator (the accumulation, data loading and process group settings the loop relies on)."""
    return Accelerator(
        mixed_precision=config.mixed_precision,
        # Both accumulation modes group micro-batches and drive gradient sync themselves (step.py): Accelerate
        # must neither divide the loss nor decide when to sync.
        gradient_accumulation_steps=1,
        log_with=config.report_to_list,
        project_dir=config.output_dir,
        # Pinned batches (make_dataloader, on CUDA) copied without blocking the host; see data.loader.prefetched.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        dynamo_backend="inductor" if config.torch_compile else None,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout)),
            # The towers' only buffers are constant position ids: DDP need not broadcast them every forward.
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    )


def _place_checkpoints(accelerator: Accelerator, output_dir: str) -> None:
    """Node-local output folders: every node keeps its own checkpoints (a resume reads them from its own disk)."""
    accelerator.project_configuration.save_on_each_node = not storage_is_shared(accelerator, output_dir)
    check_checkpoint_storage(accelerator, node_local=accelerator.project_configuration.save_on_each_node)
    if accelerator.project_configuration.save_on_each_node:
        logger.info(
            f"{output_dir} is node-local: each node keeps its own checkpoints; the model and the "
            "results are written on the main node."
        )


def _load_model_and_data(
    accelerator: Accelerator, data_config: DataConfig, model_config: ModelConfig, config: TrainConfig
):
    """Rows (cheap, checked first), then the model and tokenizer, then the cached preprocessing pass."""
    per_node = data_prepared_per_node(accelerator, data_config)
    raw_splits = load_raw_splits(accelerator, data_config, per_node=per_node)
    rows = {role: raw.rows_per_epoch for role, raw in raw_splits.items()}
    _check_split_sizes(config, accelerator.num_processes, rows)
    captions = training_captions(accelerator, raw_splits["train"], data_config)
    clip, processor = load_model_and_processor(model_config, captions)
    _check_nested_sizes(config, clip)
    check_fsdp_layers(clip)
    trainable, total = freeze_parameters(clip, model_config.freeze, model_config.freeze_vision_layers)
    how = f"freezing: {model_config.freeze}"
    if model_config.lora_rank:
        add_lora(clip, model_config)
        trainable = sum(p.numel() for p in clip.parameters() if p.requires_grad)
        total = sum(p.numel() for p in clip.parameters())
        how = f"LoRA rank {model_config.lora_rank} on {', '.join(model_config.lora_targets)} (the rest frozen)"
    if model_config.gradient_checkpointing:
        enable_gradient_checkpointing(clip)
    logger.info(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.1f}%), {how}")
    if model_config.text_positions:
        logger.info(
            f"Text positions: {text_length(clip.config)} (--text_positions; the stretched ones start untrained)"
        )
    layout = image_layout(clip, processor)
    if data_config.augment and layout.patches:
        raise UserError(
            "--augment crops square images; SigLIP 2's variable-resolution patch sequences are not augmented yet. "
            "Drop --augment (or start from a CLIP or SigLIP checkpoint)."
        )
    pairs = build_pair_datasets(
        accelerator,
        data_config,
        raw_splits,
        processor.tokenizer,
        layout,
        train_image_size=training_cache_size(layout.size) if data_config.augment else None,
        per_node=per_node,
        family=family_of(clip.config),
        text_length=text_length(clip.config),
        seed=config.seed,
        report_dir=config.output_dir,
    )
    if data_config.strict:
        check_strict(pairs, raw_splits)
    skipped = write_skip_report(pairs, raw_splits, config.output_dir) if accelerator.is_main_process else {}
    _check_split_sizes(config, accelerator.num_processes, {role: pairs[role].pairs_per_epoch for role in pairs})
    return ContrastiveModel(clip), processor, pairs, skipped


def _compute_fsdp2_like_ddp(accelerator: Accelerator) -> None:
    """FSDP2 keeps float32 parameters and reduces gradients in float32; autocast alone lowers the precision, as
    under DDP (the step and evaluation enter it themselves: Accelerate wraps no FSDP2 forward in it). Accelerate's
    default FSDP2 policy would gather bf16 parameters and sum gradients in bf16: the accumulated (no_sync)
    gradients of several micro-batches and their reduce-scatter lose bits DDP keeps, and `logit_scale` reaches
    the loss rounded to bf16 (ln 100 = 4.605 as 4.594). The price: the all-gathers move float32, twice bf16's
    bytes."""
    if not accelerator.is_fsdp2:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    logger.info(f"FSDP2: float32 parameters and gradient reduction, {accelerator.mixed_precision} autocast for compute")


def _augmenter(data_config: DataConfig, image_size: int, seed: int) -> Augmenter | None:
    if not data_config.augment:
        return None
    return Augmenter(image_size, tuple(data_config.augment_scale), data_config.augment_flip, seed)


def _weight_ema(accelerator: Accelerator, model: torch.nn.Module, config: TrainConfig) -> WeightEma | None:
    """--ema_decay's average of the prepared model's trainable parameters (FSDP2: of this process's shards), kept
    in every checkpoint."""
    if not config.ema_decay:
        return None
    ema = WeightEma(unwrap(accelerator, model), config.ema_decay, config.ema_warmup)
    count = sum(parameter.numel() for parameter in ema.parameters)
    logger.info(
        f"Weight EMA, decay {config.ema_decay:g}{' with warm-up' if config.ema_warmup else ''}: {count:,} "
        f"trainable parameters averaged in float32 ({4 * sum(a.numel() for a in ema.averages) / 2**20:.1f} MiB "
        f"on this process); {'the EMA weights are evaluated and saved' if config.ema_eval else 'kept only'}"
    )
    return ema


def _check_split_sizes(config: TrainConfig, num_processes: int, sizes: dict[str, int]) -> None:
    """Before any image is decoded (on row counts) and again after (on usable pairs)."""
    micro_batch = config.per_device_train_batch_size * num_processes
    if micro_batch > sizes["train"]:
        raise UserError(
            f"One batch of all processes ({micro_batch} = per-device batch x {num_processes} processes) exceeds "
            f"the {sizes['train']} training pairs; lower --per_device_train_batch_size."
        )
    for role in ("validation", "test"):
        if sizes[role] < max(RECALL_KS):
            raise UserError(
                f"The {role} split has {sizes[role]} pairs, but recall@{max(RECALL_KS)} needs at least "
                f"{max(RECALL_KS)}; use a larger split (or a larger --max_eval_samples)."
            )


def _loss(family, config: TrainConfig):
    """The family's loss, with --negative_hardness where it is set (CLIP's softmax alone has negatives to weight),
    summed over --matryoshka_dims' sizes where they are given."""
    loss = LOSSES[family.loss]
    if config.negative_hardness:
        if family.sigmoid:
            raise UserError(
                f"--negative_hardness weights negatives inside CLIP's softmax; {family.name}'s sigmoid loss scores "
                "each pair on its own, with no softmax to weight: drop --negative_hardness, or start from a CLIP model."
            )
        loss = functools.partial(loss, negative_hardness=config.negative_hardness)
    if config.matryoshka_sizes:
        loss = functools.partial(nested_loss, loss, config.matryoshka_sizes)
    return loss


def _check_nested_sizes(config: TrainConfig, clip) -> None:
    """--matryoshka_dims against the loaded model's embedding size (before the data is preprocessed)."""
    sizes = config.matryoshka_sizes
    if not sizes:
        return
    width = embedding_size(clip.config.to_dict())
    if sizes[0] > width:
        raise UserError(
            f"--matryoshka_dims {config.matryoshka_dims}: {sizes[0]} exceeds this model's embedding size, {width}; "
            f"list sizes of at most {width} (e.g. {','.join(str(width >> shift) for shift in range(4))})."
        )
    smaller = [str(size) for size in sizes if size < width]
    listed = f" and the first {', '.join(smaller)} renormalised" if smaller else " alone (no smaller size listed)"
    logger.info(f"--matryoshka_dims: the loss is summed over the full {width} dims{listed}")


def _check_hard_negative_batches(accelerator: Accelerator, data_config: DataConfig, config: TrainConfig) -> None:
    group_size = config.hard_negative_batches
    if not group_size:
        return
    if data_config.streaming:
        raise UserError(
            "--hard_negative_batches orders a cached split by its mined neighbours: it needs every training row "
            "embedded before training and read in any order, and a stream is read in its shards' order. Drop "
            "--streaming (or --hard_negative_batches)."
        )
    everyone = config.per_device_train_batch_size * accelerator.num_processes
    if everyone % group_size:
        raise UserError(
            f"--hard_negative_batches {group_size} does not divide the batch of all processes ({everyone} = "
            f"{config.per_device_train_batch_size} per device x {accelerator.num_processes} processes): groups of "
            "neighbours would be cut between batches. Choose a group size that divides it."
        )


def _neighbour_sampler(accelerator, model, pairs, normalizer, config: TrainConfig) -> NeighbourSampler | None:
    """The training order of --hard_negative_batches (None without): mined with the model as the first epoch
    starts (the starting model), and with --hard_negative_refresh again at the start of every N-th epoch; a resumed
    run reads the neighbours its checkpoint holds."""
    if not config.hard_negative_batches:
        return None
    mine = TrainingNeighbours(
        accelerator,
        model,
        pairs,
        normalizer,
        config.per_device_eval_batch_size,
        config.hard_negative_batches,
        config.hard_negative_threshold,
    )
    return NeighbourSampler(len(pairs), config.hard_negative_batches, config.seed, mine, config.hard_negative_refresh)


def _check_lora(accelerator: Accelerator, model_config: ModelConfig, config: TrainConfig) -> None:
    if not model_config.lora_rank:
        return
    if config.layer_decay < 1:
        raise UserError(
            f"--layer_decay {config.layer_decay:g} with --lora_rank: LoRA freezes every layer whose rate layer decay "
            "would scale and trains only its adapters. Drop --layer_decay, or fine-tune without LoRA."
        )
    if accelerator.is_fsdp2 or accelerator.distributed_type.value == "DEEPSPEED":
        raise UserError(
            "--lora_rank runs on one device or under DDP (the adapters are small: every process holds them whole); "
            "launch without FSDP/DeepSpeed, e.g. --config_file accelerate_configs/multi_gpu.yaml."
        )
    if model_config.lora_dropout and config.accumulation == "exact" and config.gradient_accumulation_steps > 1:
        raise UserError(
            "--lora_dropout with exact accumulation: each micro-batch runs twice and dropout would draw other "
            "masks the second time, so the gradient would not be exact. Use --lora_dropout 0 or --accumulation plain."
        )


def _check_output_dir(config: TrainConfig) -> None:
    taken = os.path.isfile(os.path.join(config.output_dir, "model.safetensors"))
    if taken and not config.overwrite_output_dir:
        raise UserError(
            f"{config.output_dir} already holds a model. Choose another --output_dir or pass --overwrite_output_dir."
        )


def _log_truncation(pairs: dict, model_config) -> None:
    """One line per split: how many captions were longer than the text tower reads, and so truncated (a stream's
    are counted as it is read: reported at the end)."""
    positions = model_config.text_config.max_position_embeddings
    hint = ""
    if family_of(model_config) is CLIP:
        longer = long_clip_positions(positions)
        hint = f"--text_positions {longer} keeps up to {longer}"
    for role, split in pairs.items():
        if split.truncation is None:
            logger.info(f"{role}: streamed; the captions it truncates are counted as it is read, reported at the end")
        else:
            logger.info(split.truncation.describe(role, hint))


def _log_startup(accelerator: Accelerator, config: TrainConfig, total_steps: int, pairs: dict, shared: int) -> None:
    processes = accelerator.num_processes
    logger.info(
        f"Processes: {processes} ({accelerator.distributed_type.value}) on {accelerator.device.type}; "
        f"mixed precision: {accelerator.mixed_precision}"
    )
    logger.info(
        f"Global batch: {config.global_batch_size(processes)} = {config.per_device_train_batch_size} per device "
        f"x {processes} processes x {config.gradient_accumulation_steps} accumulation steps"
    )
    logger.info(
        f"Pairs: train {pairs['train'].pairs_per_epoch}{' (streamed: rows per epoch)' if shared is None else ''}, "
        f"validation {len(pairs['validation'])}, test {len(pairs['test'])}; "
        f"optimizer steps: {total_steps}"
    )
    identical = config.caption_positives == "identical"
    treated = "positives of each other" if identical else "negatives (--caption_positives own)"
    counted = "Streamed (not counted ahead): pairs that" if shared is None else f"{shared} training pairs"
    logger.info(f"{counted} share their caption with another; in one batch they are {treated}")
