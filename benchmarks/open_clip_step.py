"""open_clip's training step on the shapes of benchmarks/gpu_throughput.py, for the side-by-side row.

What `open_clip_train.train.train_one_epoch` does per step without accumulation: ViT-B-32 from open_clip's own
config (random init), bf16 autocast, `ClipLoss`, backward, AdamW (no weight decay on gains and biases, as its
`main.py` groups them), logit_scale clamped to ln(100); images already normalised on the device, captions of 77
tokens (open_clip's tokenizer always pads to the context length). Prints pairs/s, peak memory and MFU on the same
FLOP count as gpu_throughput.py (at 77 text tokens). Where open_clip does not import, says why and exits 0.

    python benchmarks/open_clip_step.py                       # GPU, batch 256
    python benchmarks/open_clip_step.py --device cpu          # smoke test (tiny batch), when open_clip imports
"""

from __future__ import annotations

import argparse
import math
import time

import common
import torch  # noqa: E402
from gpu_throughput import forward_flops_per_pair, peak_flops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="Default 256 (CPU 4).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default 30, CPU 2).")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 4)
    steps = args.steps or (30 if device.type == "cuda" else 2)
    try:
        import open_clip
    except Exception as error:  # not carried, or a torchvision that does not match this torch
        message = f"open_clip not run: `import open_clip` fails ({type(error).__name__}: {error})"
        print(message)
        common.write_markdown(args.markdown, message)
        return
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, device=device)
    model.train()
    loss_fn = open_clip.ClipLoss()
    named = list(model.named_parameters())
    exclude = [p for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    rest = [p for n, p in named if not any(p is q for q in exclude)]
    optimizer = torch.optim.AdamW(
        [{"params": exclude, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=device.type == "cuda",
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 224, 224, generator=generator).to(device)
    texts = torch.randint(1, 49407, (batch_size, 77), generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    for _ in range(3 if device.type == "cpu" else 5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = steps * batch_size / (time.perf_counter() - start)
    flops = 3 * forward_flops_per_pair(common.preset_config("clip-vit-b-32"), 77)
    peak = peak_flops(device, None)
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "n/a"
    mfu = f"{100 * rate * flops / peak:.1f}%" if peak else "n/a"
    table = common.markdown_table(
        ["step", "batch", "pairs/s", "peak memory (GiB)", "text tokens", "MFU"],
        [[f"open_clip {open_clip.__version__} ViT-B-32, bf16 autocast", batch_size, round(rate, 1), memory, 77, mfu]],
    )
    print(table)
    common.write_markdown(args.markdown, table)


if __name__ == "__main__":
    main()
