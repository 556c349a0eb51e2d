"""Scenarios run on 2 CPU processes by test_distributed.py (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`),
and on 1 process in-process for the reference. Each writes what it measured to OUTDIR/<scenario>-<world>.pt.

Usage: torchrun --nproc_per_node 2 tests/distributed_worker.py OUTDIR
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from transformers import CLIPModel, Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel, get_scheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_clip_config, tiny_siglip2_values, tiny_siglip_values  # noqa: E402

from clip_accel.checkpoint import TrainerState  # noqa: E402
from clip_accel.config import ModelConfig  # noqa: E402
from clip_accel.ema import WeightEma  # noqa: E402
from clip_accel.evaluation import embed_split, evaluate_retrieval  # noqa: E402
from clip_accel.lora import add_lora  # noqa: E402
from clip_accel.loss import contrastive_loss, nested_loss, sigmoid_loss  # noqa: E402
from clip_accel.model import ContrastiveModel, PixelNormalizer, freeze_parameters  # noqa: E402
from clip_accel.step import MAX_LOGIT_SCALE, StepContext, exact_step, plain_step  # noqa: E402
from clip_accel.tokenizer import build_offline_tokenizer  # noqa: E402
from clip_accel.trainer import optimizer_step_batches  # noqa: E402

GLOBAL_BATCH = 16
SIGLIP_VALUES = {key: value for key, value in tiny_siglip_values().items() if key != "model_type"}
SIGLIP2_VALUES = {key: value for key, value in tiny_siglip2_values(patch_size=4).items() if key != "model_type"}
# SigLIP 2's patch sequences: 16 patches of 4 x 4 pixels, each image its own grid (most leave padding)
PATCHES, PATCH_VALUES, GRIDS = 16, 4 * 4 * 3, [(4, 4), (2, 7), (3, 5), (1, 16), (5, 2)]
EVAL_PAIRS = 45  # divisible neither by the 2 processes nor by the eval batch of 8
EOS = 2  # the tiny config's end-of-text id


# Pairs whose caption repeats an earlier one's (copy: original). One step of 2 processes x 8 (pairs 0-7 are process
# 0's, 8-15 process 1's; micro-batches of 4): within a micro-batch (1, 14), across micro-batches of one process
# (6), across processes (9, 12, 15). Plain accumulation's global micro-batches of 4 (pairs 4k..4k+3, 4k and 4k+1 on
# process 0): 14 and 13 straddle the processes inside one.
REPEATS = {1: 0, 6: 2, 9: 1, 12: 3, 15: 3, 14: 13}


class Epochs:
    """The training-data interface (`data.training_data`) over a prepared loader of synthetic pairs."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, done: int = 0):
        self.loader.set_epoch(epoch)
        return iter(self.loader)

    def taken(self, batch: dict) -> None:
        pass


def synthetic_pairs(
    count: int, seed: int, text_length: int = 7, patches: bool = False, repeats: str | None = None
) -> list[dict[str, torch.Tensor]]:
    """Random pairs. `repeats`: give the pairs in REPEATS their original's caption id, with its token ids
    ("same") or with their own ("own tokens": as if dropout made two embeddings of one caption differ; with equal
    texts CLIP's softmax loss is the same with or without positives, and the mask would go untested)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, PATCHES, PATCH_VALUES) if patches else (count, 32, 32, 3)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    input_ids = torch.randint(3, 500, (count, text_length), generator=generator)
    input_ids[:, -1] = EOS
    caption_ids = torch.arange(count) * 1000 + 17
    for copy, original in REPEATS.items() if repeats else ():
        caption_ids[copy] = caption_ids[original]
        if repeats == "same":
            input_ids[copy] = input_ids[original]
    pairs = [{"pixel_values": pixels[i], "input_ids": input_ids[i]} for i in range(count)]
    for i, pair in enumerate(pairs if repeats else []):
        pair["caption_ids"] = caption_ids[i]
    for i, pair in enumerate(pairs if patches else []):
        pair["spatial_shapes"] = torch.tensor(GRIDS[i % len(GRIDS)])
    return pairs


def stack(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def step_context(
    accelerator: Accelerator,
    freeze: str = "none",
    local_loss: bool = False,
    lora: bool = False,
    siglip: bool = False,
    siglip2: bool = False,
    positives: str = "own",
) -> StepContext:
    torch.manual_seed(0)
    if siglip2:
        clip = Siglip2Model(Siglip2Config(**SIGLIP2_VALUES))
    else:
        clip = SiglipModel(SiglipConfig(**SIGLIP_VALUES)) if siglip else CLIPModel(tiny_clip_config())
    siglip = siglip or siglip2
    freeze_parameters(clip, freeze, vision_layers=1)
    if lora:
        add_lora(clip, ModelConfig(lora_rank=4, lora_alpha=8.0))
        for name, parameter in clip.named_parameters():  # lora_B starts at 0, which leaves lora_A no gradient
            if ".lora_B." in name:
                torch.nn.init.normal_(parameter, std=0.05)
    model = ContrastiveModel(clip)
    # Plain SGD: the weights after one step are `before - lr * gradient`, so comparing them compares gradients.
    # (Adam's first step is ~lr * sign(g) and would turn rounding noise in near-zero gradients into lr-sized
    # differences.)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_scheduler("constant", optimizer)
    normalizer = PixelNormalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).to(accelerator.device)
    if siglip:  # the sigmoid loss, its learned bias, no cap on the scale
        with torch.no_grad():
            model_module = accelerator.unwrap_model(model)
            model_module.logit_scale.fill_(2.3)
            model_module.logit_bias.fill_(-3.0)
        return StepContext(
            accelerator, model, optimizer, scheduler, normalizer, 1.0, True, sigmoid_loss, None, positives
        )
    return StepContext(
        accelerator, model, optimizer, scheduler, normalizer, 1.0, local_loss, caption_positives=positives
    )


def one_step(
    accelerator: Accelerator,
    micro_batches_per_process: int,
    *,
    freeze: str = "none",
    local_loss: bool = False,
    lora: bool = False,
    siglip: bool = False,
    siglip2: bool = False,
    repeats: str | None = None,
    ema: bool = False,
    hardness: float = 0.0,
    sizes: tuple[int, ...] = (),
) -> dict:
    """One optimizer step on this process's share of the same global batch of 16 pairs. `repeats`: with the
    repeated captions of REPEATS as positives (see `synthetic_pairs`); `ema`: the weight EMA's average after
    it too (decay 0.5); `hardness`: the loss's --negative_hardness; `sizes`: its --matryoshka_dims."""
    positives = "identical" if repeats else "own"
    context = step_context(accelerator, freeze, local_loss, lora, siglip, siglip2, positives)
    if hardness:
        context.loss = functools.partial(contrastive_loss, negative_hardness=hardness)
    if sizes:
        context.loss = functools.partial(nested_loss, context.loss, sizes)
    if ema:
        context.ema = WeightEma(accelerator.unwrap_model(context.model), 0.5)
    siglip = siglip or siglip2
    before = {n: p.detach().clone() for n, p in accelerator.unwrap_model(context.model).named_parameters()}
    pairs = synthetic_pairs(GLOBAL_BATCH, seed=1, text_length=64 if siglip else 7, patches=siglip2, repeats=repeats)
    per_process = GLOBAL_BATCH // accelerator.num_processes
    mine = pairs[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
    size = per_process // micro_batches_per_process
    micro_batches = [stack(mine[i : i + size]) for i in range(0, per_process, size)]
    take_step = exact_step if len(micro_batches) > 1 else plain_step
    loss, _ = take_step(context, micro_batches)
    loss = accelerator.reduce(loss, "mean") if local_loss or siglip else loss
    after = {n: p.detach().clone() for n, p in accelerator.unwrap_model(context.model).named_parameters()}
    averages = dict(zip(context.ema.names, context.ema.averages, strict=True)) if ema else None
    return {"loss": loss.item(), "before": before, "after": after, "ema": averages}


class StepCounter:
    """A constant schedule that counts the optimizer steps taken (the step code steps it once per real step)."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


ACCUMULATION, EPOCHS, MICRO_BATCH = 4, 2, 4  # micro-batches per step, epochs, pairs per global micro-batch


def plain_accumulation(accelerator: Accelerator, batches_per_epoch: int, repeats: str | None = None) -> dict:
    """EPOCHS epochs of plain accumulation through the trainer's own grouping and step: each global micro-batch
    of MICRO_BATCH pairs spread over the processes, ACCUMULATION micro-batches per optimizer step. `repeats`:
    with REPEATS' captions as positives."""
    context = step_context(accelerator, positives="identical" if repeats else "own")
    context.scheduler = StepCounter()
    pairs = synthetic_pairs(MICRO_BATCH * batches_per_epoch, seed=3, repeats=repeats)
    # Not shuffled: on N processes global micro-batch i is rank 0's batch i, then rank 1's, ...: the same pairs,
    # in the same order, as batch i of one process reading MICRO_BATCH at a time.
    loader = DataLoader(pairs, batch_size=MICRO_BATCH // accelerator.num_processes, collate_fn=stack, drop_last=True)
    loader = accelerator.prepare(loader)
    state = TrainerState()
    for micro_batches, _ in optimizer_step_batches(Epochs(loader), state, ACCUMULATION):
        plain_step(context, micro_batches)
        if state.epoch == EPOCHS:
            break
    weights = ContrastiveModel.clip_state_dict(accelerator.unwrap_model(context.model).state_dict())
    return {"optimizer_steps": context.scheduler.steps, "after": weights}


def plain_accumulation_by_hand(batches_per_epoch: int) -> dict:
    """The reference for `plain_accumulation`, written out without the trainer: for each run of up to
    ACCUMULATION consecutive micro-batches of an epoch, the mean of their losses' gradients, clipped, one SGD
    step, logit_scale clamped."""
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    normalizer = PixelNormalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    pairs = synthetic_pairs(MICRO_BATCH * batches_per_epoch, seed=3)
    batches = [stack(pairs[start : start + MICRO_BATCH]) for start in range(0, len(pairs), MICRO_BATCH)]
    steps = 0
    for _ in range(EPOCHS):
        for start in range(0, len(batches), ACCUMULATION):
            group = batches[start : start + ACCUMULATION]
            optimizer.zero_grad()
            for batch in group:
                outputs = model(input_ids=batch["input_ids"], pixel_values=normalizer(batch["pixel_values"]))
                loss = contrastive_loss(outputs.image_embeds, outputs.text_embeds, model.logit_scale)
                (loss / len(group)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            steps += 1
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return {"optimizer_steps": steps, "after": {n: p.detach().clone() for n, p in model.named_parameters()}}


def evaluate(accelerator: Accelerator) -> dict:
    context = step_context(accelerator)
    loader = accelerator.prepare(DataLoader(synthetic_pairs(EVAL_PAIRS, seed=2), batch_size=8))
    return evaluate_retrieval(accelerator, context.model, loader, context.normalizer)


COLLECTIVES = ("all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "all_reduce", "broadcast")


def record_collectives(records: list) -> Callable[[], None]:
    """Append (collective, shapes of its tensor arguments) to `records` for every call of the collectives that
    NCCL needs equal sizes for, until the returned function is called."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def recorder(name: str):
        def recording(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            records.append((name, [tuple(tensor.shape) for tensor in tensors]))
            return originals[name](*args, **kwargs)

        return recording

    for name in COLLECTIVES:
        setattr(dist, name, recorder(name))
    return lambda: [setattr(dist, name, original) for name, original in originals.items()]


def uneven_evaluation(accelerator: Accelerator) -> dict:
    """EVAL_PAIRS (45) pairs in batches of 8 on each process (uneven last batches): retrieval with zero-shot
    prompts, image-only embedding and one exact step, every collective's sizes recorded on every process."""
    context = step_context(accelerator, local_loss=True)
    pairs = synthetic_pairs(EVAL_PAIRS, seed=2)
    loader = accelerator.prepare(DataLoader(pairs, batch_size=8))
    labels = [("kurta", "saree", "sherwani")[i % 3] for i in range(EVAL_PAIRS)]
    tokenizer = build_offline_tokenizer(["a red kurta", "a blue saree", "a black sherwani", "a photo of a"] * 3)
    records = []
    stop_recording = record_collectives(records)
    try:
        metrics = evaluate_retrieval(accelerator, context.model, loader, context.normalizer, tokenizer, labels)
        image_only, _ = embed_split(accelerator, context.model, loader, context.normalizer, with_text=False)
        mine = pairs[accelerator.process_index * 8 : (accelerator.process_index + 1) * 8]
        exact_step(context, [stack(mine[:4]), stack(mine[4:])])
    finally:
        stop_recording()
    return {"metrics": metrics, "image_only": image_only, "collectives": gather_object([records])}


SCENARIOS = {
    "step": lambda acc: one_step(acc, 1),
    "step_local_loss": lambda acc: one_step(acc, 1, local_loss=True),
    "step_exact_accumulation": lambda acc: one_step(acc, 2),
    "step_exact_accumulation_4": lambda acc: one_step(acc, 4),
    "ema_step": lambda acc: one_step(acc, 1, ema=True),
    "step_exact_accumulation_local_loss": lambda acc: one_step(acc, 2, local_loss=True),
    **{
        f"freeze_{strategy}": (lambda acc, s=strategy: one_step(acc, 1, freeze=s))
        for strategy in ("none", "vision_layers", "backbones")
    },
    "siglip_step": lambda acc: one_step(acc, 1, siglip=True),
    "siglip_step_exact_accumulation": lambda acc: one_step(acc, 2, siglip=True),
    "siglip2_step": lambda acc: one_step(acc, 1, siglip2=True),
    "siglip2_step_exact_accumulation": lambda acc: one_step(acc, 2, siglip2=True),
    "lora_step": lambda acc: one_step(acc, 1, lora=True),
    "lora_step_exact_accumulation": lambda acc: one_step(acc, 2, lora=True),
    # Repeated captions as positives, the repeats straddling micro-batches and processes (REPEATS).
    "positives_step": lambda acc: one_step(acc, 1, repeats="own tokens"),
    "positives_step_local_loss": lambda acc: one_step(acc, 1, local_loss=True, repeats="own tokens"),
    "positives_step_exact_accumulation": lambda acc: one_step(acc, 2, repeats="own tokens"),
    "positives_step_exact_accumulation_local_loss": lambda acc: one_step(acc, 2, local_loss=True, repeats="own tokens"),
    # Hard negatives weighted by their similarity (--negative_hardness), with the repeats as positives.
    "hardness_step": lambda acc: one_step(acc, 1, repeats="own tokens", hardness=4.0),
    "hardness_step_local_loss": lambda acc: one_step(acc, 1, local_loss=True, repeats="own tokens", hardness=4.0),
    "hardness_step_exact_accumulation": lambda acc: one_step(acc, 2, repeats="own tokens", hardness=4.0),
    "hardness_step_exact_accumulation_local_loss": lambda acc: one_step(
        acc, 2, local_loss=True, repeats="own tokens", hardness=4.0
    ),
    # Nested sizes (--matryoshka_dims; the tiny CLIP's embeddings are 16 wide, SigLIP's 32), with the repeats as
    # positives and hard negatives.
    "matryoshka_step": lambda acc: one_step(acc, 1, repeats="own tokens", hardness=4.0, sizes=(8, 4)),
    "matryoshka_step_local_loss": lambda acc: one_step(
        acc, 1, local_loss=True, repeats="own tokens", hardness=4.0, sizes=(8, 4)
    ),
    "matryoshka_step_exact_accumulation": lambda acc: one_step(
        acc, 2, repeats="own tokens", hardness=4.0, sizes=(8, 4)
    ),
    "matryoshka_step_exact_accumulation_local_loss": lambda acc: one_step(
        acc, 2, local_loss=True, repeats="own tokens", hardness=4.0, sizes=(8, 4)
    ),
    "siglip_matryoshka_step": lambda acc: one_step(acc, 1, siglip=True, sizes=(32, 16, 8)),
    "siglip_matryoshka_step_exact_accumulation": lambda acc: one_step(acc, 2, siglip=True, sizes=(32, 16, 8)),
    "siglip_positives_step": lambda acc: one_step(acc, 1, siglip=True, repeats="same"),
    "siglip_positives_step_exact_accumulation": lambda acc: one_step(acc, 2, siglip=True, repeats="same"),
    "plain_accumulation_positives": lambda acc: plain_accumulation(acc, 8, repeats="own tokens"),
    "evaluate": evaluate,
    "uneven_evaluation": uneven_evaluation,
    "plain_accumulation_8": lambda acc: plain_accumulation(acc, 8),  # 2 full groups an epoch
    "plain_accumulation_6": lambda acc: plain_accumulation(acc, 6),  # a full group, then a short one of 2
}


def main(outdir: str) -> None:
    accelerator = Accelerator(cpu=True)
    # A silent single-process launch must not pass for a two-process one.
    assert accelerator.num_processes == int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes
    for name, scenario in SCENARIOS.items():
        result = scenario(accelerator)
        if accelerator.is_main_process:
            torch.save(result, os.path.join(outdir, f"{name}-{accelerator.num_processes}.pt"))
        accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
