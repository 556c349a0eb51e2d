"""ONNX for serving: the demo model's test-split recall and speed in torch, as ONNX float32 and as ONNX int8.

The demo recipe's tiny CLIP is trained (`--config demo`, into the benchmark folder; or `--model FOLDER` reuses a
trained folder such as outputs/demo), exported with `clip_accel.onnx_export.export_onnx(..., quantize=True)`, and
the demo's test split is embedded three ways from the same processor inputs (`serving_inputs`). Recall@1/5 both
ways by `clip_accel.metrics.retrieval_metrics`, the files' sizes, and the median seconds per batch (image tower +
text tower) of each way, interleaved batch by batch; ONNX Runtime gets as many threads as torch.

    python benchmarks/onnx_quantize.py [--model outputs/demo] [--batch_size 50] [--markdown FILE]
    python benchmarks/onnx_quantize.py --smoke    # seconds: 1 epoch on 128 pairs, 40 test pairs
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from clip_accel.data.demo import write_demo_dataset  # noqa: E402
from clip_accel.data.indo_fashion import IndoFashionFolder  # noqa: E402
from clip_accel.metrics import retrieval_metrics  # noqa: E402
from clip_accel.model import load_pretrained  # noqa: E402
from clip_accel.onnx_export import export_onnx, serving_inputs  # noqa: E402

ROOT = common.BENCH_DIR / "onnx_quantize"
WAYS = ("torch", "ONNX float32", "ONNX int8")
KEYS = ["image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5"]


def trained_demo(smoke: bool) -> tuple[str, str]:
    """(model folder, data folder): the demo recipe trained into the benchmark folder (smoke: 1 epoch, 128 pairs)."""
    output, data = ROOT / ("smoke" if smoke else "demo"), write_demo_dataset(ROOT / "demo-data")
    argv = ["--config", "demo", "--demo", "false", "--data_dir", str(data), "--output_dir", str(output)]
    argv += ["--cache_dir", str(ROOT / "cache")]
    if smoke:
        argv += ["--num_train_epochs", "1", "--max_train_samples", "128", "--max_eval_samples", "40"]
    common.train_row(argv)
    return str(output), str(data)


def embedders(model, folder: str) -> dict:
    """Each way's function from (image inputs, text inputs) to (image_embeds, text_embeds) as numpy arrays."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()

    def onnx_way(suffix: str):
        image, text = (
            onnxruntime.InferenceSession(os.path.join(folder, f"{tower}_model{suffix}.onnx"), options)
            for tower in ("image", "text")
        )
        return lambda images, texts: (image.run(None, images)[0], text.run(None, texts)[0])

    @torch.no_grad()
    def torch_way(images: dict, texts: dict):
        tensors = {name: torch.from_numpy(value) for name, value in {**images, **texts}.items()}
        image_embeds = model.get_image_features(**{name: tensors[name] for name in images}).pooler_output
        text_embeds = model.get_text_features(**{name: tensors[name] for name in texts}).pooler_output
        return image_embeds.numpy(), text_embeds.numpy()

    return dict(zip(WAYS, (torch_way, onnx_way(""), onnx_way("_int8")), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="A trained demo folder to reuse (else the demo is trained).")
    parser.add_argument("--data_dir", default=None, help="Its demo catalogue (default: the benchmark's own).")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="1 epoch on 128 pairs, 40 test pairs: every code path.")
    parser.add_argument("--markdown", default=None, help="Also write the tables to this file.")
    args = parser.parse_args()
    folder, data = (args.model, args.data_dir or str(ROOT / "demo-data")) if args.model else trained_demo(args.smoke)
    model, processor = load_pretrained(folder)
    model.eval()
    exported = export_onnx(model, processor, str(ROOT / "export"), quantize=True)
    rows = IndoFashionFolder(data).read("test").dataset
    rows = rows.select(range(40)) if args.smoke else rows
    ways = embedders(model, exported["folder"])
    embeddings = {way: ([], []) for way in WAYS}
    seconds = {way: [] for way in WAYS}
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        images = [Image.open(path).convert("RGB") for path in batch["image"]]
        inputs = serving_inputs(model.config, processor, images, batch["caption"])
        for way, embed in ways.items():
            begin = time.perf_counter()
            image_embeds, text_embeds = embed(*inputs)
            seconds[way].append(time.perf_counter() - begin)
            embeddings[way][0].append(image_embeds)
            embeddings[way][1].append(text_embeds)
    sizes = {
        "torch": os.path.getsize(os.path.join(folder, "model.safetensors")),
        "ONNX float32": os.path.getsize(exported["image_model"]) + os.path.getsize(exported["text_model"]),
        "ONNX int8": os.path.getsize(exported["image_model_int8"]) + os.path.getsize(exported["text_model_int8"]),
    }
    torch_batch = statistics.median(seconds["torch"][1:] or seconds["torch"])  # the first batch: warm-up
    table = []
    for way in WAYS:
        image_embeds, text_embeds = (
            F.normalize(torch.from_numpy(np.concatenate(parts)), dim=-1) for parts in embeddings[way]
        )
        metrics = retrieval_metrics(image_embeds, text_embeds, ks=(1, 5))
        batch_seconds = statistics.median(seconds[way][1:] or seconds[way])
        table.append(
            [way]
            + [f"{metrics[key]:.4f}" for key in KEYS]
            + [f"{sizes[way] / 2**20:.2f}", f"{batch_seconds * 1000:.1f}", f"{torch_batch / batch_seconds:.2f}"]
        )
    headers = ["Embedded by", *KEYS, "MiB (both towers)", "ms per batch (median)", "speed-up over torch"]
    lines = [
        f"Demo test split: {len(rows)} pairs in batches of {args.batch_size}; model {folder}; export's largest "
        f"difference from torch {max(exported['max_difference'].values()):.1e}. {common.machine_description()}",
        "",
        common.markdown_table(headers, table),
    ]
    text = "\n".join(lines)
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
