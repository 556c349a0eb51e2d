"""GPU training throughput of ViT-B/32 CLIP (random init, clip_accel/presets/clip-vit-b-32.json) at 224 px, bf16.

Rows (one command, one table):
- clip_accel's trainer as shipped: `prepare_run` + `fit` (Accelerate, bf16, fused AdamW, TF32, its loader read
  ahead by a background thread with pinned non-blocking copies), timed through fit's `on_step_end` hook, within
  one epoch (no epoch-end checkpoint or evaluation in the timed steps; the checkpoint is timed apart);
- the same trainer's step (`plain_step` on prepare_run's StepContext) on batches already on the device;
- a lean step (PixelNormalizer + CLIPModel + clip_accel.loss.contrastive_loss under bf16 autocast, clip at 1.0,
  AdamW) with each fast-path option switched on or off: SDPA vs eager attention, fused vs foreach AdamW, TF32,
  gradient checkpointing, torch.compile; fed either synthetic uint8 data already on the device (no input cost)
  or the real loader (pinned memory, non_blocking copies).

Reported per row: pairs/s (timed steps after warm-up, synchronised), peak memory allocated, model FLOPs per pair
(analytic: 3x the forward FLOPs at the row's mean text length; ViT-B/32 is ~14.8 GFLOP forward at 77 tokens) and
MFU against the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; pass --peak-tflops for other cards).

    python benchmarks/gpu_throughput.py                          # on a GPU: batch 256, 30 timed steps per row
    python benchmarks/gpu_throughput.py --device cpu --steps 3   # smoke test of every code path (tiny batch)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from dataclasses import dataclass

import common
import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from clip_accel.checkpoint import TrainerState, save_checkpoint  # noqa: E402
from clip_accel.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from clip_accel.loss import contrastive_loss  # noqa: E402
from clip_accel.model import PixelNormalizer  # noqa: E402
from clip_accel.step import MAX_LOGIT_SCALE, plain_step  # noqa: E402
from clip_accel.trainer import fit, prepare_run  # noqa: E402

# Dense bf16 peaks (TFLOP/s), matched in this order against the device name: the PCIe H100 before the SXM one.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
INDO_FASHION_TRAIN_PAIRS = 91_166
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Variant:
    name: str
    data: str = "synthetic"  # "synthetic" (uint8 already on the device) or "loader" (the real loader)
    attention: str = "sdpa"
    fused_adamw: bool = True
    tf32: bool = True
    checkpointing: bool = False
    compile: bool = False
    trainer: bool = False  # clip_accel's prepare_run + plain_step instead of the lean step


VARIANTS = [
    Variant("clip_accel trainer as shipped (prepare_run + fit), real loader", data="loader", trainer=True),
    Variant("clip_accel step (plain_step) on batches already on the device", trainer=True),
    Variant("lean step, eager, SDPA, fused AdamW, TF32 (reference)"),
    Variant("  + real loader instead of on-device data", data="loader"),
    Variant("  eager attention instead of SDPA", attention="eager"),
    Variant("  foreach AdamW instead of fused", fused_adamw=False),
    Variant("  TF32 off", tf32=False),
    Variant("  gradient checkpointing on", checkpointing=True),
    Variant("  torch.compile", compile=True),
    Variant("  torch.compile + real loader", data="loader", compile=True),
]


# ------------------------------------------------------------------------------------------------------ FLOPs
def forward_flops_per_pair(config: CLIPConfig, text_length: float) -> float:
    """Matmul FLOPs of one image + one caption through both towers and projections (2 per multiply-add)."""

    def tower(width: int, mlp: int, layers: int, tokens: float) -> float:
        dense = 2 * tokens * (4 * width * width + 2 * width * mlp)  # qkv + out projections, two MLP matmuls
        attention = 2 * 2 * tokens * tokens * width  # scores and weighted sum
        return layers * (dense + attention)

    vision, text = config.vision_config, config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    flops = 2 * patches * 3 * vision.patch_size**2 * vision.hidden_size  # patch embedding
    flops += tower(vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, patches + 1)
    flops += tower(text.hidden_size, text.intermediate_size, text.num_hidden_layers, text_length)
    flops += 2 * (vision.hidden_size + text.hidden_size) * config.projection_dim
    return flops


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# ------------------------------------------------------------------------------------------------------- data
def synthetic_batches(batch_size: int, text_length: int, image_size: int, vocab_size: int, eos: int, device):
    """One random batch, uint8 pixels (B, S, S, 3), input_ids ending in end-of-text and distinct caption ids (the
    trainer's identical-caption positives read them), already on the device."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
    input_ids = torch.randint(0, eos, (batch_size, text_length), generator=generator)
    input_ids[:, -1] = eos
    batch = {"pixel_values": pixels.to(device), "input_ids": input_ids.to(device)}
    batch["caption_ids"] = torch.arange(batch_size, device=device)
    while True:
        yield batch


def loader_batches(loader, device):
    """Epoch after epoch of the real loader, copied to the device without blocking (the loader pins on CUDA)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            yield {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        epoch += 1


def real_pairs(data_dir: str, work: str, image_size: int, num_workers: int):
    """The benchmark set through clip_accel's preprocessing cache (the tokenizer is learned from the captions)."""
    from clip_accel.data.indo_fashion import IndoFashionFolder
    from clip_accel.data.loader import PairDataset
    from clip_accel.data.preprocess import preprocess_split
    from clip_accel.tokenizer import build_offline_tokenizer

    raw = IndoFashionFolder(data_dir).read("train")
    tokenizer = build_offline_tokenizer(raw.dataset["caption"])
    cached = preprocess_split(raw, tokenizer, image_size, os.path.join(work, "cache"), max(1, num_workers))
    return PairDataset(cached, tokenizer.pad_token_id), tokenizer


# ------------------------------------------------------------------------------------------------------ steps
def build_model(config: CLIPConfig, variant: Variant, device) -> CLIPModel:
    torch.manual_seed(0)
    model = CLIPModel(config).to(device)
    model.set_attn_implementation(variant.attention)
    if variant.checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def lean_step(model: CLIPModel, variant: Variant, device, amp_dtype):
    normalizer = PixelNormalizer(CLIP_MEAN, CLIP_STD).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=variant.fused_adamw,
        foreach=None if variant.fused_adamw else True,
    )

    def loss_of(batch):
        with torch.autocast(device.type, dtype=amp_dtype):
            outputs = model(input_ids=batch["input_ids"], pixel_values=normalizer(batch["pixel_values"]))
        return contrastive_loss(outputs.image_embeds, outputs.text_embeds, model.logit_scale)

    compute_loss = torch.compile(loss_of) if variant.compile else loss_of

    def step(batch):
        loss = compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # no .item(): no host sync inside the step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    return step


def trainer_run(data_dir: str, work: str, batch_size: int, total_steps: int, num_workers: int, device, preset: str):
    """clip_accel's own prepare_run (bf16), evaluating only after `total_steps`."""
    data_config = DataConfig(
        data_dir=data_dir,
        cache_dir=os.path.join(work, "cache"),
        max_eval_samples=64,
        preprocessing_num_workers=max(1, num_workers),
    )
    train_config = TrainConfig(
        output_dir=os.path.join(work, "trainer-out"),
        overwrite_output_dir=True,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        max_steps=total_steps,
        eval_steps=total_steps,
        eval_initial_model=False,
        mixed_precision="bf16",
        dataloader_num_workers=num_workers,
        seed=0,
    )
    if device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    return prepare_run(data_config, ModelConfig(scratch_config=preset), train_config)


def time_fit(run, warmup: int, steps: int, device) -> float:
    """Seconds of `steps` optimizer steps of fit() after `warmup` steps, measured by its on_step_end hook (fit
    runs one step more, whose evaluation falls outside the window)."""
    marks = {}

    def on_step_end(state) -> None:
        if state.step in (warmup, warmup + steps):
            synchronize(device)
            marks[state.step] = time.perf_counter()

    fit(run, TrainerState(), on_step_end=on_step_end)
    return marks[warmup + steps] - marks[warmup]


def mean_text_length(run, batch_size: int, steps: int) -> float:
    """Mean padded caption length of `steps` training batches (for the FLOP count of the fit row)."""
    from clip_accel.data.loader import make_dataloader

    lengths = [
        batch["input_ids"].shape[1]
        for batch, _ in zip(make_dataloader(run.train_data.pairs, batch_size, train=True), range(steps), strict=False)
    ]
    return sum(lengths) / len(lengths)


# ----------------------------------------------------------------------------------------------------- measure
def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: Variant, args, config: CLIPConfig, device, work: str, pairs_and_tokenizer) -> dict:
    torch.set_float32_matmul_precision("high" if variant.tf32 else "highest")
    gc.collect()  # the previous row's model and optimizer, or its peak memory counts in this row's
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    warmup = args.warmup_steps * (3 if variant.compile else 1)
    model_config, batches = config, None
    if variant.trainer:
        total = warmup + args.steps + 1
        run = trainer_run(args.data_dir, work, args.batch_size, total, args.num_workers, device, args.preset)
        model_config = run.accelerator.unwrap_model(run.model).clip.config
        step = lambda batch: plain_step(run.step_context, [batch])  # noqa: E731
    else:
        model = build_model(config, variant, device)
        step = lean_step(model, variant, device, torch.bfloat16)
    if variant.data == "synthetic":
        batches = synthetic_batches(
            args.batch_size,
            args.text_length,
            config.vision_config.image_size,
            model_config.text_config.vocab_size,
            model_config.text_config.eos_token_id,
            device,
        )
    elif not variant.trainer:
        from clip_accel.data.loader import make_dataloader

        pairs, _ = pairs_and_tokenizer()
        batches = loader_batches(
            make_dataloader(pairs, args.batch_size, train=True, num_workers=args.num_workers), device
        )
    if batches is None:  # the trainer as shipped: fit() with its own loader
        seconds = time_fit(run, warmup, args.steps, device)
        text_length = mean_text_length(run, args.batch_size, args.steps)
        return _result(variant, args, model_config, device, seconds, text_length, run)
    graphs_before = _compiled_graphs()
    for _ in range(warmup):
        step(next(batches))
    synchronize(device)
    text_tokens = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(batches)
        text_tokens += batch["input_ids"].shape[1]
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    notes = (
        f"{_compiled_graphs() - graphs_before} graphs compiled (text length varies per batch)"
        if (variant.compile and variant.data == "loader")
        else ""
    )
    return _result(variant, args, model_config, device, seconds, text_tokens / args.steps, None, notes)


def _result(variant, args, model_config, device, seconds, text_length, run, notes: str = "") -> dict:
    pairs_per_second = args.steps * args.batch_size / seconds
    flops = 3 * forward_flops_per_pair(model_config, text_length)
    peak = peak_flops(device, args.peak_tflops)
    result = {
        "notes": notes,
        "pairs_per_second": pairs_per_second,
        "text_length": text_length,
        "train_gflop_per_pair": flops / 1e9,
        "mfu": pairs_per_second * flops / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if run is not None:  # what fit() adds at every epoch end: a full checkpoint (weights + AdamW state + RNG)
        with common.Stopwatch() as clock:
            save_checkpoint(run.accelerator, run.config.output_dir, TrainerState(step=1), 1)
        result["checkpoint_seconds"] = clock.seconds
    gc.collect()
    return result


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30, help="Timed optimizer steps per row.")
    parser.add_argument("--warmup-steps", type=int, default=5, help="Untimed steps first (x3 for torch.compile).")
    parser.add_argument("--batch-size", type=int, default=None, help="Per GPU; default 256 (4 on the CPU).")
    parser.add_argument("--text-length", type=int, default=32, help="Tokens per synthetic caption.")
    parser.add_argument("--num-workers", type=int, default=0, help="Real loader's DataLoader workers.")
    parser.add_argument("--num-images", type=int, default=None, help="Benchmark set size (default 2,048; CPU 64).")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak for MFU on other cards.")
    parser.add_argument("--only", nargs="*", default=None, help="Run only rows whose name contains one of these.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--markdown", default=None, help="Also write the table to this markdown file.")
    parser.add_argument(
        "--preset", default="clip-vit-b-32", help="Bundled model preset (clip-tiny for a quick CPU smoke test)."
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 4)
    args.warmup_steps = args.warmup_steps if device.type == "cuda" else 1
    # Enough pairs that the trainer row's timed steps stay within its first epoch.
    num_images = args.num_images or (args.warmup_steps + args.steps + 2) * args.batch_size
    args.data_dir = str(common.write_bench_dataset(num_train=num_images, num_val=64, num_test=64))
    work = tempfile.mkdtemp(prefix="clip_accel_gpu_bench-")
    config = common.preset_config(args.preset)

    cached_pairs = []

    def pairs_and_tokenizer():
        if not cached_pairs:
            cached_pairs.append(real_pairs(args.data_dir, work, config.vision_config.image_size, args.num_workers))
        return cached_pairs[0]

    if device.type == "cuda":
        device_name = f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        device_name = f"{common.machine_description()} (CPU smoke test: these numbers say nothing about GPUs)"
    print(f"Device: {device_name}\n")
    print(
        f"CLIP preset {args.preset} at {config.vision_config.image_size} px, random init, bf16 autocast, batch "
        f"{args.batch_size}, {args.steps} timed steps after {args.warmup_steps} warm-up (x3 compiled); "
        f"reference: {forward_flops_per_pair(config, 77) / 1e9:.1f} GFLOP forward per pair at 77 tokens\n"
    )
    rows, results = [], {}
    for variant in VARIANTS:
        if args.only and not any(key in variant.name for key in args.only):
            continue
        try:
            result = measure(variant, args, config, device, work, pairs_and_tokenizer)
        except Exception as error:  # one broken option must not hide the other rows
            rows.append([variant.name, "failed", "-", "-", "-", "-", f"{type(error).__name__}: {error}"[:160]])
            continue
        results[variant.name] = result
        memory = f"{result['peak_memory_gb']:.1f}" if result["peak_memory_gb"] is not None else "n/a"
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
        rows.append(
            [
                variant.name,
                round(result["pairs_per_second"], 1),
                memory,
                f"{result['text_length']:.0f}",
                f"{result['train_gflop_per_pair']:.1f}",
                mfu,
                result["notes"],
            ]
        )
    table = common.markdown_table(
        ["variant", "pairs/s", "peak memory (GiB)", "text tokens", "train GFLOP/pair", "MFU", "notes"], rows
    )
    print(table)
    common.write_markdown(
        args.markdown, f"Device: {device_name}; batch {args.batch_size}, {args.steps} timed steps\n\n{table}"
    )
    for result in results.values():
        if "checkpoint_seconds" in result:
            seconds, steps_per_second = result["checkpoint_seconds"], result["pairs_per_second"] / args.batch_size
            epoch_steps = INDO_FASHION_TRAIN_PAIRS // args.batch_size
            print(
                f"\nclip_accel's epoch-end checkpoint (weights + AdamW state + RNG) took {seconds:.2f} s = "
                f"{seconds * steps_per_second:.1f} optimizer steps at the trainer row's speed; an Indo-fashion epoch "
                f"({INDO_FASHION_TRAIN_PAIRS:,} pairs) is {epoch_steps} steps at batch {args.batch_size}."
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "batch_size": args.batch_size, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
