"""The one-off preprocessing pass: decode every image once, tokenize every caption once, cache the result.

Images are stored as uint8 HWC at the model's resolution (normalised later, on the device: float32 pixels would
cost 4x the disk). Captions are stored unpadded; batches are padded to their longest caption at load time.
The `datasets.map` cache is keyed by an explicit fingerprint of everything that shapes the output, so a second
identical run decodes nothing, and any change to the rows, image files, tokenizer or resolution starts afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..tokenizer import MAX_TEXT_TOKENS
from .sources import RawSplit

# Bump when the cached layout or the pixel pipeline changes, so old caches are not reused.
PREPROCESS_VERSION = 2
# What PIL can raise for a file that is missing, empty, truncated, corrupt, not an image, or a decompression bomb.
IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def cached_features(image_size: int) -> datasets.Features:
    return datasets.Features(
        {
            "pixel_values": datasets.Sequence(datasets.Value("uint8"), length=image_size * image_size * 3),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "caption": datasets.Value("string"),
            "label": datasets.Value("string"),
            "source_row": datasets.Value("int64"),
            "skip_reason": datasets.Value("string"),
        }
    )


def load_rgb_image(source: str | dict, image_size: int, *, draft: bool = True, square: bool = False) -> np.ndarray:
    """Decode, convert to RGB, resize the shortest edge to `image_size` (bicubic) and centre-crop: (S, S, 3) uint8.
    With `square` (SigLIP's processor), resize to S x S (bicubic) without a crop instead.

    `draft` lets libjpeg downscale while decoding (2-3x faster on product photos); it never goes below the
    requested size, so the final bicubic resize sees at least as many pixels as it outputs, but for a JPEG at
    least twice the model's resolution the pixels differ from `CLIPProcessor`'s. Training uses it; evaluation
    splits are decoded in full (`draft=False`), so reported recall is what users get at inference.
    """
    if isinstance(source, dict):
        source = io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    with warnings.catch_warnings():
        # Above Image.MAX_IMAGE_PIXELS PIL only warns (it raises at twice that); a catalogue photo that large is
        # far more likely a decompression bomb than a product, so treat the warning as a bad row too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(source)
    with image:
        if draft:
            image.draft("RGB", (image_size, image_size))
        image = to_rgb(image)
        image.load()  # decode now, while the file is open
    if square:
        return np.asarray(image.resize((image_size, image_size), Image.Resampling.BICUBIC), dtype=np.uint8)
    width, height = image.size
    # Same arithmetic as CLIPImageProcessor (long edge = int(size * long / short)), so training sees the pixels
    # that CLIPProcessor gives users at inference.
    if width <= height:
        resized = (image_size, int(image_size * height / width))
    else:
        resized = (int(image_size * width / height), image_size)
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - image_size) // 2, (resized[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' `convert_to_rgb` does it (transparency composited on white), so training sees what
    `CLIPProcessor` shows the model at inference; 16/32-bit greyscale is scaled to 8 bits instead of clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


class PairPreprocessor:
    """Batched `datasets.map` function: raw rows -> cached rows. A bad row is kept with a `skip_reason`
    (and blank pixels) instead of failing the whole pass; the loader leaves such rows out and reports them."""

    def __init__(
        self,
        tokenizer,
        image_size: int,
        max_length: int,
        draft: bool = True,
        require_captions: bool = True,
        square: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_length = max_length
        self.draft = draft
        self.square = square
        self.require_captions = require_captions  # False: images alone (an image folder to embed)

    def __call__(self, batch: dict) -> dict:
        pixels, reasons = [], []
        for image, caption, label in zip(batch["image"], batch["caption"], batch["label"], strict=True):
            reason = "" if not self.require_captions or (caption and caption.strip()) else "empty caption"
            if not reason and label is not None and not label.strip():  # None: the source has no labels
                reason = "empty class label"
            array = None
            if not reason:
                try:
                    array = load_rgb_image(image, self.image_size, draft=self.draft, square=self.square)
                except IMAGE_ERRORS as error:
                    reason = f"unreadable image: {type(error).__name__}: {error}"
            blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
            pixels.append((blank if array is None else array).reshape(-1))
            reasons.append(reason)
        captions = [caption or "" for caption in batch["caption"]]
        # Truncation keeps the end-of-text token, which is where CLIP pools the text tower.
        input_ids = self.tokenizer(captions, truncation=True, max_length=self.max_length)["input_ids"]
        return {
            "pixel_values": pixels,
            "input_ids": input_ids,
            "caption": captions,
            "label": [label or "" for label in batch["label"]],
            "source_row": batch["source_row"],
            "skip_reason": reasons,
        }


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the token ids. Truncation and padding are left out: calling the tokenizer changes
    them on the backend, which would otherwise give every run a new fingerprint and never reuse the cache."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]


def preprocess_split(
    raw: RawSplit,
    tokenizer,
    image_size: int,
    cache_dir: str,
    num_proc: int = 1,
    *,
    draft: bool = True,
    require_captions: bool = True,
    square: bool = False,
) -> datasets.Dataset:
    """Decode and tokenize one split through `datasets.map`, reusing the cache when nothing changed. `draft`: the
    fast JPEG decode (training), or the exact `CLIPProcessor` pixels (evaluation splits). Without
    `require_captions` an empty caption is not a reason to skip the row (images to embed). `square`: SigLIP's
    resize without crop."""
    max_length = min(tokenizer.model_max_length, MAX_TEXT_TOKENS)
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                PREPROCESS_VERSION,
                raw.fingerprint,
                image_size,
                max_length,
                tokenizer_fingerprint(tokenizer),
                draft,
                *([] if require_captions else ["captions optional"]),
                *(["square resize"] if square else []),
            ]
        ).encode()
    ).hexdigest()[:32]
    os.makedirs(cache_dir, exist_ok=True)
    return raw.dataset.map(
        PairPreprocessor(tokenizer, image_size, max_length, draft, require_captions, square),
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 and len(raw.dataset) >= 2 * num_proc else None,
        remove_columns=raw.dataset.column_names,
        features=cached_features(image_size),
        cache_file_name=os.path.join(cache_dir, f"{raw.name}-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        desc=f"Preprocessing {raw.name} (decoded once, then cached)",
    )
