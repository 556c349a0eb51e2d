"""Shared helpers for the benchmarks: the benchmark image set, machine description, timing and tables.

The benchmark set imitates Indo-fashion: product photos about 320 px on the long side (here 240 x 320 JPEG,
quality 90) with photo-like content (gradients, shapes, texture, sensor noise: not flat colour, so JPEG decoding
costs what it costs on real photos), written in the Indo-fashion layout (`train_data.json` + `images/train/N.jpeg`)
so the project's real Indo-fashion reader is what reads it.

Import this module before `datasets`/`transformers`: it points the Hub offline and the datasets cache at the
benchmark folder.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(os.environ.get("CLIP_ACCEL_BENCH_DIR", os.path.join(tempfile.gettempdir(), "clip_accel_bench")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", str(BENCH_DIR / "datasets-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the tables

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from clip_accel.data.demo import CLASS_LABELS  # noqa: E402
from clip_accel.data.indo_fashion import write_indo_fashion_split  # noqa: E402

IMAGE_WIDTH, IMAGE_HEIGHT, JPEG_QUALITY = 240, 320, 90
_FORMAT_VERSION = 1

# A small CLIP at 224 px for the CPU benchmarks: width 128, 4 layers per tower, 32 px patches.
SMALL_CLIP_CONFIG = {
    "projection_dim": 128,
    "text_config": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
    },
    "vision_config": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 32,
    },
}

_COLOURS = (
    "red",
    "maroon",
    "blue",
    "navy",
    "green",
    "olive",
    "yellow",
    "mustard",
    "black",
    "pink",
    "peach",
    "orange",
    "purple",
    "beige",
    "white",
    "grey",
    "teal",
    "magenta",
)
_FABRICS = ("cotton", "silk", "rayon", "georgette", "chiffon", "linen", "art silk", "crepe", "velvet")
_PATTERNS = ("solid", "printed", "embroidered", "striped", "checked", "floral", "woven design", "zari work")
_BRANDS = ("Kesar Lane", "Neelvastra", "Chandni Looms", "Aangan Studio", "Pankhudi", "Roshni Craft", "Tarangini")
_EXTRAS = (
    "with dupatta",
    "with blouse piece",
    "with zari border",
    "with tassels",
    "with pockets",
    "",
    "for festive wear",
    "for daily wear",
    "with mirror work",
)


def write_bench_dataset(
    root: Path | None = None, num_train: int = 1000, num_val: int = 100, num_test: int = 100, seed: int = 0
) -> Path:
    """Write (once) the benchmark set in the Indo-fashion layout; later calls reuse it. Returns its folder."""
    root = root or BENCH_DIR / ("indo-fashion-bench" if num_train == 1000 else f"indo-fashion-bench-{num_train}")
    marker = {
        "version": _FORMAT_VERSION,
        "train": num_train,
        "val": num_val,
        "test": num_test,
        "seed": seed,
        "size": [IMAGE_WIDTH, IMAGE_HEIGHT],
        "quality": JPEG_QUALITY,
    }
    marker_file = root / "bench.json"
    if marker_file.is_file() and json.loads(marker_file.read_text()) == marker:
        return root
    with multiprocessing.Pool(os.cpu_count()) as pool:  # every item has its own seed: same output in parallel
        for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
            make_item = functools.partial(_make_item, split=split, seed=seed)
            pool_map = functools.partial(pool.map, chunksize=16)
            write_indo_fashion_split(root, split, make_item, count, map_items=pool_map, quality=JPEG_QUALITY)
    marker_file.write_text(json.dumps(marker))
    return root


def _make_item(index: int, split: str, seed: int) -> tuple[dict, Image.Image]:
    """One product photo and its annotation fields."""
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split), index])
    label = CLASS_LABELS[int(rng.integers(len(CLASS_LABELS)))]
    photo = _product_photo(rng)  # before the title: the same draws from rng as every earlier version of the set
    return {"product_title": _title(rng, label), "class_label": label, "brand": ""}, photo


def _product_photo(rng: np.random.Generator) -> Image.Image:
    """A 240 x 320 'product photo': lit gradient backdrop, a textured garment-like shape, props, blur and noise."""
    height, width = IMAGE_HEIGHT, IMAGE_WIDTH
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(150, 250, 3), rng.uniform(120, 240, 3)
    light = 1.0 - 0.25 * ((x - rng.uniform(0, width)) ** 2 + (y - rng.uniform(0, height)) ** 2) / (width * height)
    backdrop = (top + (bottom - top) * (y / height)[..., None]) * light[..., None]
    # A garment: a polygon filled with a woven/printed texture (two sinusoids) in a random colour.
    base = rng.uniform(20, 235, 3)
    frequency, angle = rng.uniform(0.08, 0.5), rng.uniform(0, np.pi)
    weave = np.sin(frequency * (x * np.cos(angle) + y * np.sin(angle))) * np.sin(0.5 * frequency * (x - y))
    texture = np.clip(base + rng.uniform(15, 50) * weave[..., None] * rng.uniform(0.5, 1.0, 3), 0, 255)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    centre_x, centre_y = rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.6) * height
    points = [
        (centre_x + rng.uniform(0.2, 0.45) * width * np.cos(t), centre_y + rng.uniform(0.2, 0.5) * height * np.sin(t))
        for t in np.sort(rng.uniform(0, 2 * np.pi, 9))
    ]
    draw.polygon(points, fill=255)
    garment = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)[..., None] / 255.0
    image = backdrop * (1 - garment) + texture * garment
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):  # props, trims, buttons, a logo
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = (x0, y0, x0 + rng.uniform(5, 60), y0 + rng.uniform(5, 60))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.7))  # lens softness
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 5.0, (height, width, 3))  # sensor noise
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _title(rng: np.random.Generator, label: str) -> str:
    """A product title like Indo-fashion's (brand, gender, colour, fabric, pattern, item, extras)."""

    def pick(options):
        return options[int(rng.integers(len(options)))]

    gender = "Men's" if label.endswith("_men") or label in ("sherwanis", "nehru_jackets") else "Women's"
    noun = label.replace("_", " ").replace(" men", "").replace(" women", "")
    words = [
        pick(_BRANDS),
        gender,
        pick(_COLOURS),
        "&",
        pick(_COLOURS),
        pick(_PATTERNS),
        pick(_FABRICS),
        noun,
        pick(_EXTRAS),
    ]
    return " ".join(word for word in words if word)


def write_model_config(path: Path = BENCH_DIR / "clip-bench-small.json", config: dict = SMALL_CLIP_CONFIG) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return str(path)


def machine_description() -> str:
    """CPU model, cores, torch version and the load average (other processes share this machine)."""
    import torch
    import transformers

    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}; load average {load}"
    )


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: str | None, text: str) -> None:
    """The scripts' `--markdown FILE`: also write what they printed (nothing when no path was given)."""
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")


def preset_config(name: str):
    """A CLIPConfig from clip_accel's bundled presets (clip_accel/presets/NAME.json)."""
    from importlib import resources

    from transformers import CLIPConfig

    return CLIPConfig(**json.loads((resources.files("clip_accel") / "presets" / f"{name}.json").read_text()))


def median(values: list[float]) -> float:
    return statistics.median(values)


T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}  # by seeds


def spread(values: list[float]) -> str:
    """Mean ± standard deviation over seeds, e.g. `0.650 ± 0.045` (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def paired(values: list[float]) -> str:
    """Mean paired difference over seeds and its 95% interval (Student's t, seeds - 1 degrees of freedom), e.g.
    `+0.012 [-0.004, +0.028]` (the mean alone for one seed)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:+.3f}"
    half = T_975[len(values)] * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def train_row(argv: list[str]) -> tuple[dict, float]:
    """`clip-accel train ARGV` in this process (train_and_publish): its metrics and wall seconds. Accelerate's
    process state is reset after it, so the next row builds its own Accelerator."""
    from accelerate.state import AcceleratorState

    from clip_accel.cli import train_and_publish
    from clip_accel.options import parse_config

    start = time.perf_counter()
    try:
        result = train_and_publish(*parse_config(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return result.metrics, time.perf_counter() - start
