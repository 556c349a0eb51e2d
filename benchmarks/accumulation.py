"""Exact (GradCache) against plain gradient accumulation, side by side: speed, and how close each gradient is.

Both rows call the trainer's own step functions (`clip_accel.step.exact_step` / `plain_step`) on a StepContext
built as `prepare_run` builds it (Accelerate, ContrastiveModel, the trainer's fused AdamW, clip at 1.0), over the
same in-memory batches, K micro-batches per optimizer step:

- speed: timed windows of each, interleaved in a new random order every round (load on this shared machine hits
  both alike); exact does one extra forward per micro-batch, so the ideal ratio is 0.75 (3 units of work per
  micro-batch become 4), the target >= 0.70;
- accuracy: the gradient of exact K x B/K and of one batch of B, under each mixed precision, against one batch of
  B in float32 (relative L2 error over all parameters). Exact accumulation should add no error of its own: its
  error should be within 2x of the big batch's in the same precision.

    python benchmarks/accumulation.py                                  # CPU: small CLIP, K=4 x 16
    python benchmarks/accumulation.py --device cuda                    # GPU: ViT-B/32, 4 x 64, bf16 and fp16
    python benchmarks/accumulation.py --device cpu --smoke             # seconds: every code path, tiny sizes
"""

from __future__ import annotations

import argparse
import random
import time

import common
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from accelerate.utils import GradScalerKwargs  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from clip_accel.config import TrainConfig  # noqa: E402
from clip_accel.model import ContrastiveModel, PixelNormalizer  # noqa: E402
from clip_accel.optim import build_optimizer  # noqa: E402
from clip_accel.step import StepContext, exact_step, plain_step  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class NoSchedule:
    def step(self) -> None:
        pass


def clip_config(device: torch.device, smoke: bool) -> CLIPConfig:
    if device.type == "cuda" and not smoke:
        return common.preset_config("clip-vit-b-32")
    config = dict(common.SMALL_CLIP_CONFIG)
    if smoke:
        config["vision_config"] = {**config["vision_config"], "image_size": 64}
    return CLIPConfig(**config)


def batches(config: CLIPConfig, count: int, size: int, device: torch.device, text_length: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    side, vocab = config.vision_config.image_size, config.text_config.vocab_size
    eos = config.text_config.eos_token_id if config.text_config.eos_token_id < vocab else vocab - 1
    result = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (size, side, side, 3), dtype=torch.uint8, generator=generator)
        input_ids = torch.randint(0, eos, (size, text_length), generator=generator)
        input_ids[:, -1] = eos
        result.append({"pixel_values": pixels.to(device), "input_ids": input_ids.to(device)})
    return result


def step_context(config: CLIPConfig, device: torch.device, precision: str, max_grad_norm: float) -> StepContext:
    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision in the same process
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=device.type == "cpu",
        kwargs_handlers=[GradScalerKwargs(init_scale=2.0**10)],  # a first step that does not overflow
    )
    torch.manual_seed(0)
    clip = CLIPModel(config)
    if config.text_config.eos_token_id >= config.text_config.vocab_size:  # the preset's id for the real vocab
        clip.config.text_config.eos_token_id = config.text_config.vocab_size - 1
    model = ContrastiveModel(clip)
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-4))
    model, optimizer = accelerator.prepare(model, optimizer)
    normalizer = PixelNormalizer(CLIP_MEAN, CLIP_STD).to(accelerator.device)
    return StepContext(accelerator, model, optimizer, NoSchedule(), normalizer, max_grad_norm, local_loss=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(args, config: CLIPConfig, device: torch.device) -> list[list]:
    precision = "bf16" if device.type == "cuda" else "no"
    micro = args.micro_batch
    data = batches(config, args.k, micro, device)
    steps = {
        f"plain K={args.k}": (step_context(config, device, precision, 1.0), plain_step),
        f"exact K={args.k}": (step_context(config, device, precision, 1.0), exact_step),
    }
    seconds = {name: [] for name in steps}
    for context, take_step in steps.values():  # warm-up
        for _ in range(args.warmup_steps):
            take_step(context, data)
    shuffler = random.Random(0)
    for _ in range(args.windows):
        for name in shuffler.sample(list(steps), len(steps)):
            context, take_step = steps[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.window_steps):
                take_step(context, data)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    pairs = args.window_steps * args.k * micro
    rates = {name: common.median([pairs / s for s in values]) for name, values in seconds.items()}
    plain, exact = rates[f"plain K={args.k}"], rates[f"exact K={args.k}"]
    return [
        [f"plain K={args.k} x {micro}", precision, round(plain, 1), "1.00x", "each micro-batch its own negatives"],
        [
            f"exact K={args.k} x {micro}",
            precision,
            round(exact, 1),
            f"{exact / plain:.2f}x",
            f"the loss over all {args.k * micro}; target >= 0.70x (ideal 0.75x): "
            + ("met" if exact / plain >= 0.70 else "MISSED"),
        ],
    ]


def gradient(config: CLIPConfig, device: torch.device, precision: str, micro_batches: list[dict]) -> torch.Tensor:
    """All parameter gradients of one step (exact when given several micro-batches), flattened, float32."""
    context = step_context(config, device, precision, 0.0)  # 0: no clipping, the raw gradient
    captured = []
    inner = context.optimizer.optimizer
    inner.register_step_pre_hook(
        lambda optimizer, *_: captured.append(
            torch.cat([p.grad.detach().float().flatten() for group in optimizer.param_groups for p in group["params"]])
        )
    )
    take_step = exact_step if len(micro_batches) > 1 else plain_step
    _, skipped = take_step(context, micro_batches)
    if bool(skipped) or not captured:
        raise RuntimeError(f"{precision}: the step was skipped (non-finite gradients)")
    return captured[0]


def accuracy(args, config: CLIPConfig, device: torch.device) -> list[list]:
    micro = args.micro_batch
    parts = batches(config, args.k, micro, device)
    whole = [{key: torch.cat([part[key] for part in parts]) for key in parts[0]}]
    reference = gradient(config, device, "no", whole)
    norm = reference.norm()
    rows = []
    precisions = ["no", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    for precision in precisions:
        try:
            big = (gradient(config, device, precision, whole) - reference).norm() / norm
            exact = (gradient(config, device, precision, parts) - reference).norm() / norm
        except RuntimeError as error:
            rows.append([precision, "-", "-", "-", str(error)])
            continue
        ratio = exact / big if big > 0 else float("nan")
        verdict = "met" if precision == "no" or ratio <= 2 else "MISSED"
        rows.append(
            [
                {"no": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + grad scaler"}[precision],
                f"{big:.2e}",
                f"{exact:.2e}",
                f"{ratio:.2f}" if precision != "no" else "-",
                "float32 sanity row: both should be ~1e-6" if precision == "no" else f"target <= 2: {verdict}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, one window: checks every code path.")
    parser.add_argument("--k", type=int, default=4, help="Micro-batches per optimizer step.")
    parser.add_argument("--micro-batch", type=int, default=None, help="Pairs per micro-batch (GPU 64, CPU 16).")
    parser.add_argument("--windows", type=int, default=None, help="Timed windows per row (default 6).")
    parser.add_argument("--window-steps", type=int, default=3, help="Optimizer steps per window.")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="Also write the tables to this file.")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.micro_batch = args.micro_batch or (64 if device.type == "cuda" else 16)
    args.windows = args.windows or (1 if args.smoke else 6)
    if args.smoke:
        args.micro_batch, args.window_steps, args.warmup_steps = 4, 1, 1
    config = clip_config(device, args.smoke)
    torch.set_float32_matmul_precision("highest")  # the float32 reference in full precision, TF32 off
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        where = common.machine_description()
    model = (
        f"CLIP width {config.vision_config.hidden_size}, {config.vision_config.num_hidden_layers}+"
        f"{config.text_config.num_hidden_layers} layers, {config.vision_config.image_size} px"
    )
    lines = [
        f"Device: {where}",
        f"Model: {model}, random init; {args.k} micro-batches of {args.micro_batch} pairs per optimizer step\n",
        "### Speed (median window)\n",
        common.markdown_table(
            ["accumulation", "precision", "pairs/s", "ratio to plain", "notes"], speed(args, config, device)
        ),
        f"\n### Gradient error against one batch of {args.k * args.micro_batch} in float32 (relative L2)\n",
        common.markdown_table(
            [
                "precision",
                f"one batch of {args.k * args.micro_batch}",
                f"exact {args.k} x {args.micro_batch}",
                "exact / one batch",
                "notes",
            ],
            accuracy(args, config, device),
        ),
    ]
    text = "\n".join(lines)
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
