"""A small synthetic fashion catalogue in the Indo-fashion Kaggle layout, for trying the trainer offline.

Why: the real Indo-fashion download is 100k+ images behind a Kaggle login. The demo writes the same layout
(`{train,val,test}_data.json` JSON lines + `images/{split}/N.jpeg`), so the project's real Indo-fashion reader
is what reads it, and its content is learnable by a tiny CLIP trained from scratch in minutes on a CPU:
every title names the garment's class, main colour, pattern and border colour, and each is drawn visibly
(class-specific silhouette, fill colour, pattern in a shade of it, a trim band in the border colour).

Every item gets its own RNG seeded from (seed, split, index), so output is byte-identical for the same
arguments and a split's first N items do not change when another split's count does.

`shared_titles` imitates a catalogue that repeats titles: that share of the items (in pairs: item 2k+1 takes item
2k's product, drawn again with its own jitter, scale and position) has a title another item also has, as a
catalogue lists one product under several photos. The default (0) leaves only the repeats the random draws make.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from functools import partial
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from ..config import UserError
from .indo_fashion import INDO_FASHION_FILES, write_indo_fashion_split

__all__ = ["CLASS_LABELS", "DEMO_MARKER", "write_demo_dataset"]

CLASS_LABELS: tuple[str, ...] = (
    "blouse",
    "dhoti_pants",
    "dupattas",
    "gowns",
    "kurta_men",
    "leggings_and_salwars",
    "lehenga",
    "mojaris_men",
    "mojaris_women",
    "nehru_jackets",
    "palazzos",
    "petticoats",
    "saree",
    "sherwanis",
    "women_kurta",
)
# Bump when the drawing or the titles change, so caches written by an older generator are rewritten.
_FORMAT_VERSION = 1
DEMO_MARKER = ".clip_accel_demo.json"

_COLOURS = {
    "red": (205, 25, 30),
    "blue": (30, 70, 210),
    "green": (20, 150, 45),
    "yellow": (245, 215, 20),
    "black": (20, 20, 20),
    "pink": (250, 120, 185),
    "orange": (250, 125, 10),
    "purple": (120, 35, 160),
}
# No white/ivory: on the light background such a garment would lose its silhouette.
_BORDERS = {
    "gold": (215, 170, 25),
    "silver": (185, 190, 200),
    "maroon": (110, 0, 30),
    "teal": (0, 135, 130),
    "navy": (0, 10, 95),
}
_PATTERNS = ("plain", "striped", "checked", "polka dot")
_BRANDS = (
    "Kesar Lane",
    "Neelvastra",
    "Chandni Looms",
    "Aangan Studio",
    "Pankhudi",
    "Roshni Craft",
    "Tarangini",
    "Sitara Weaves",
)
_FABRICS = ("cotton", "silk", "rayon", "georgette", "chiffon", "linen")
_SHOE_FABRICS = ("leather", "velvet", "embroidered leather")
# (gender word, human-readable noun) per class; gender is kept apart so templates can place it.
_NOUNS = {
    "blouse": ("Women's", "blouse"),
    "dhoti_pants": ("Women's", "dhoti pants"),
    "dupattas": ("Women's", "dupatta"),
    "gowns": ("Women's", "gown"),
    "kurta_men": ("Men's", "kurta"),
    "leggings_and_salwars": ("Women's", "salwar leggings"),
    "lehenga": ("Women's", "lehenga"),
    "mojaris_men": ("Men's", "mojaris"),
    "mojaris_women": ("Women's", "mojaris"),
    "nehru_jackets": ("Men's", "nehru jacket"),
    "palazzos": ("Women's", "palazzos"),
    "petticoats": ("Women's", "petticoat"),
    "saree": ("Women's", "saree"),
    "sherwanis": ("Men's", "sherwani"),
    "women_kurta": ("Women's", "kurta"),
}
_TEMPLATES = (
    "{G} {c} {p} {f} {n} with {b} border",
    "{C} {p} {f} {n} for {g} with {b} border by {brand}",
    "{G} {c} {p} {n}, {b} trim",
    "{brand} {c} {p} {f} {n} for {g} with {b} border",
)

Poly = list[tuple[float, float]]


def _mirror(poly: Poly) -> Poly:
    return [(1.0 - x, y) for x, y in reversed(poly)]


def _shift(poly: Poly, dx: float) -> Poly:
    return [(x + dx, y) for x, y in poly]


_SHERWANI_HALF = [(0.49, 0.08), (0.49, 0.94), (0.28, 0.94), (0.28, 0.32), (0.17, 0.72), (0.08, 0.7), (0.24, 0.08)]
_JACKET_HALF = [(0.3, 0.16), (0.4, 0.16), (0.47, 0.42), (0.47, 0.76), (0.25, 0.76), (0.25, 0.4), (0.33, 0.3)]
_SHOE_MEN = [(0.04, 0.86), (0.06, 0.64), (0.24, 0.6), (0.36, 0.7), (0.47, 0.56), (0.45, 0.86)]
_SHOE_WOMEN = [(0.05, 0.9), (0.07, 0.7), (0.24, 0.67), (0.46, 0.82), (0.46, 0.9)]
# Unit-square silhouettes (x right, y down); the gaps between halves read as front openings or legs.
_SHAPES: dict[str, list[Poly]] = {
    "blouse": [
        [
            (0.32, 0.28),
            (0.42, 0.28),
            (0.5, 0.36),
            (0.58, 0.28),
            (0.68, 0.28),
            (0.87, 0.38),
            (0.81, 0.5),
            (0.68, 0.44),
            (0.68, 0.64),
            (0.32, 0.64),
            (0.32, 0.44),
            (0.19, 0.5),
            (0.13, 0.38),
        ]
    ],
    "women_kurta": [
        [
            (0.36, 0.1),
            (0.45, 0.1),
            (0.5, 0.17),
            (0.55, 0.1),
            (0.64, 0.1),
            (0.84, 0.5),
            (0.76, 0.53),
            (0.64, 0.3),
            (0.76, 0.9),
            (0.24, 0.9),
            (0.36, 0.3),
            (0.24, 0.53),
            (0.16, 0.5),
        ]
    ],
    "kurta_men": [
        [
            (0.26, 0.1),
            (0.74, 0.1),
            (0.9, 0.66),
            (0.81, 0.68),
            (0.68, 0.3),
            (0.68, 0.8),
            (0.32, 0.8),
            (0.32, 0.3),
            (0.19, 0.68),
            (0.1, 0.66),
        ]
    ],
    "sherwanis": [_SHERWANI_HALF, _mirror(_SHERWANI_HALF)],
    "nehru_jackets": [_JACKET_HALF, _mirror(_JACKET_HALF)],
    "saree": [
        [(0.38, 0.22), (0.62, 0.22), (0.68, 0.94), (0.32, 0.94)],
        [(0.28, 0.12), (0.44, 0.08), (0.82, 0.6), (0.7, 0.72)],
    ],
    "lehenga": [[(0.38, 0.3), (0.62, 0.3), (0.64, 0.38), (0.95, 0.94), (0.05, 0.94), (0.36, 0.38)]],
    "gowns": [
        [(0.42, 0.08), (0.58, 0.08), (0.62, 0.22), (0.56, 0.42), (0.78, 0.94), (0.22, 0.94), (0.44, 0.42), (0.38, 0.22)]
    ],
    "petticoats": [[(0.34, 0.3), (0.66, 0.3), (0.7, 0.9), (0.3, 0.9)]],
    "palazzos": [[(0.3, 0.12), (0.7, 0.12), (0.9, 0.92), (0.54, 0.92), (0.5, 0.46), (0.46, 0.92), (0.1, 0.92)]],
    "leggings_and_salwars": [
        [(0.38, 0.08), (0.62, 0.08), (0.6, 0.94), (0.53, 0.94), (0.5, 0.38), (0.47, 0.94), (0.4, 0.94)]
    ],
    "dhoti_pants": [
        [
            (0.28, 0.12),
            (0.72, 0.12),
            (0.8, 0.5),
            (0.62, 0.92),
            (0.54, 0.92),
            (0.5, 0.62),
            (0.46, 0.92),
            (0.38, 0.92),
            (0.2, 0.5),
        ]
    ],
    "dupattas": [[(0.1, 0.06), (0.32, 0.06), (0.9, 0.94), (0.68, 0.94)]],
    "mojaris_men": [_SHOE_MEN, _shift(_SHOE_MEN, 0.5)],
    "mojaris_women": [_SHOE_WOMEN, _shift(_SHOE_WOMEN, 0.48)],
}


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A pattern colour that stays the same hue but contrasts: darker on light fills, lighter on dark ones."""
    if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 110:
        return tuple(int(c * 0.5) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * 0.55) for c in rgb)  # type: ignore[return-value]


def _fill_layer(size: int, rgb: tuple[int, int, int], pattern: str, rng: random.Random) -> Image.Image:
    """The whole canvas in the main colour plus the pattern; the garment mask later cuts the silhouette out."""
    layer = Image.new("RGB", (size, size), rgb)
    draw, shade = ImageDraw.Draw(layer), _shade(rgb)
    period = max(5, size // 8)
    width = max(1, period // 3)
    phase = rng.randrange(period)
    for k in range(phase - period, size + period, period):
        if pattern in ("striped", "checked"):
            draw.rectangle((0, k, size, k + width - 1), fill=shade)
        if pattern == "checked":
            draw.rectangle((k, 0, k + width - 1, size), fill=shade)
        if pattern == "polka dot":
            for j in range(phase - period, size + period, period):
                x = j + (period // 2 if (k // period) % 2 else 0)  # staggered rows read as dots, not a grid
                draw.ellipse((x, k, x + width + 1, k + width + 1), fill=shade)
    return layer


def _draw_item(label: str, colour: str, pattern: str, border: str, size: int, rng: random.Random) -> Image.Image:
    scale = rng.uniform(0.9, 1.04)
    dx, dy = (rng.uniform(-size / 20, size / 20) for _ in range(2))
    polys = [
        [((x - 0.5) * scale * size + size / 2 + dx, (y - 0.5) * scale * size + size / 2 + dy) for x, y in p]
        for p in _SHAPES[label]
    ]
    mask, trim = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    mask_draw, trim_draw = ImageDraw.Draw(mask), ImageDraw.Draw(trim)
    for poly in polys:
        mask_draw.polygon(poly, fill=255)
        trim_draw.polygon(poly, outline=255, width=max(1, size // 32))
    # The border is a hem band across the garment's bottom plus a thin edge, kept inside the silhouette.
    top, bottom = mask.getbbox()[1::2]  # type: ignore[index]
    trim_draw.rectangle((0, bottom - max(2, (bottom - top) // 7), size, size), fill=255)
    trim = ImageChops.multiply(trim, mask)
    background = _jitter((232, 228, 220), rng, 12)
    image = Image.new("RGB", (size, size), background)
    image.paste(_fill_layer(size, _jitter(_COLOURS[colour], rng, 14), pattern, rng), mask=mask)
    image.paste(_jitter(_BORDERS[border], rng, 10), mask=trim)
    return image


def _make_item(
    index: int, split: str, size: int, seed: int, shared_titles: float = 0.0
) -> tuple[dict[str, str], Image.Image]:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
    rng = random.Random(f"clip_accel-demo:{seed}:{split}:{index}")
    photo_rng = rng
    if (
        shared_titles
        and index % 2
        and random.Random(f"clip_accel-demo-shared:{seed}:{split}:{index}").random() < shared_titles
    ):
        # Another photo of the previous item's product: its draws for the title, new ones for the picture.
        rng = random.Random(f"clip_accel-demo:{seed}:{split}:{index - 1}")
        photo_rng = random.Random(f"clip_accel-demo-photo:{seed}:{split}:{index}")
    label, colour, pattern = rng.choice(CLASS_LABELS), rng.choice(list(_COLOURS)), rng.choice(_PATTERNS)
    border, brand = rng.choice(list(_BORDERS)), rng.choice(_BRANDS)
    gender, noun = _NOUNS[label]
    fabric = rng.choice(_SHOE_FABRICS if label.startswith("mojaris") else _FABRICS)
    title = rng.choice(_TEMPLATES).format(
        G=gender,
        g="men" if gender == "Men's" else "women",
        c=colour,
        C=colour.capitalize(),
        p=pattern,
        f=fabric,
        n=noun,
        b=border,
        brand=brand,
    )
    slug = title.lower().replace("'", "").replace(",", "").replace(" ", "-")
    fields = {"image_url": f"https://example.com/demo/{split}/{index}-{slug}.jpeg", "brand": brand}
    fields.update(product_title=title, class_label=label)
    return fields, _draw_item(label, colour, pattern, border, size, photo_rng)


def _validate(counts: dict[str, int], image_size: int, seed: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}; ask for at least one item per split.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16 pixels, got {image_size!r}; use e.g. 64.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")


def _is_current(root: Path, marker: dict[str, int]) -> bool:
    try:
        found = json.loads((root / DEMO_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == marker and all((root / name).is_file() for name in INDO_FASHION_FILES.values())


def _check_replaceable(root: Path) -> None:
    """Refuse to replace anything that is not a (possibly outdated) demo dataset or an empty folder."""
    if not root.exists():
        return
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a folder; choose another folder for the demo dataset.")
    if not (root / DEMO_MARKER).is_file() and any(root.iterdir()):
        raise UserError(
            f"{root} is not empty and is not a demo dataset (no {DEMO_MARKER}); choose another folder or an empty one."
        )


def write_demo_dataset(
    root: str | os.PathLike[str],
    *,
    num_train: int = 1200,
    num_val: int = 200,
    num_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    shared_titles: float = 0.0,
) -> Path:
    """Write the demo catalogue under root (created if missing) and return root as a Path. `shared_titles`: the
    share of items whose title another item (another photo of the same product) also has (module docstring).

    A no-op when root already holds a complete dataset written with the same arguments. Otherwise the
    dataset is built in a hidden sibling folder and renamed into place, so an interrupted run never leaves
    a half dataset that looks complete. Raises ValueError for bad arguments or when root holds other files.
    """
    counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
    _validate(counts, image_size, seed)
    if not 0 <= shared_titles <= 1:
        raise ValueError(f"shared_titles is a share of the items, in [0, 1]; got {shared_titles!r}.")
    root = Path(root)
    marker = {"format": "clip_accel-demo", "version": _FORMAT_VERSION, **counts, "image_size": image_size, "seed": seed}
    if shared_titles:  # (absent at 0, so demo folders written before the option stay current)
        marker["shared_titles"] = shared_titles
    if _is_current(root, marker):
        return root
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split, count in zip(INDO_FASHION_FILES, counts.values(), strict=True):
            make_item = partial(_make_item, split=split, size=image_size, seed=seed, shared_titles=shared_titles)
            write_indo_fashion_split(staging, split, make_item, count, quality=90, subsampling=0)
        (staging / DEMO_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
        _swap_into_place(staging, root, marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _swap_into_place(staging: Path, root: Path, marker: dict[str, int]) -> None:
    """Rename staging to root; the old root (an outdated demo or an empty folder) is moved aside first."""
    if _is_current(root, marker):
        return  # another process (e.g. another training rank) finished the same dataset first
    if not root.exists():
        try:
            staging.rename(root)
        except OSError:
            if not _is_current(root, marker):  # losing a race to a writer of the same dataset is fine
                raise
        return
    _check_replaceable(root)
    aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    try:
        root.rename(aside / "old")
        staging.rename(root)
    finally:
        if (aside / "old").exists() and not root.exists():
            (aside / "old").rename(root)  # the swap failed half-way: put the previous folder back
        shutil.rmtree(aside, ignore_errors=True)
