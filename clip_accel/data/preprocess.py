"""The one-off preprocessing pass: decode every image once, tokenize every caption once, cache the result.

Images are stored as uint8 at the model's resolution, laid out as its family's processor gives them (`ImageLayout`;
normalised later, on the device: float32 pixels would cost 4x the disk). Captions are stored unpadded (batches are
padded at load time), with a 64-bit hash of each caption's token ids (`caption_id`): the loss's identical-caption
positives compare these on the device.
The `datasets.map` cache is keyed by an explicit fingerprint of everything that shapes the output, so a second
identical run decodes nothing, and any change to the rows, image files, tokenizer or resolution starts afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import signal
import threading
import warnings
from dataclasses import dataclass, replace

import datasets
import multiprocess  # datasets' multiprocessing (its map's pool and manager)
import numpy as np
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from ..config import UserError
from ..tokenizer import MAX_TEXT_TOKENS
from .sources import RawSplit

# Bump when the cached layout or the pixel pipeline changes, so old caches are not reused.
PREPROCESS_VERSION = 5  # 5: null and non-text captions skipped (were cached as the text 'None')
# The compact cache (`--cache_format jpeg`): each resized crop re-encoded once. Quality 95 with 4:2:0 chroma: ~16 KB
# per 224 px product photo, mean absolute error ~1.4 of 255 (BENCHMARKS.md section 2).
JPEG_QUALITY = 95
# What PIL can raise for a file that is missing, empty, truncated, corrupt, not an image, or a decompression bomb.
IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


@dataclass(frozen=True)
class ImageLayout:
    """How a model family's processor turns an image into pixels, and so what the cache holds for each image.

    - "crop" (CLIP): shortest side to `size` (bicubic), centre crop: uint8 (S, S, 3).
    - "square" (SigLIP): S x S (bicubic), no crop: uint8 (S, S, 3).
    - "patches" (SigLIP 2's NaFlex): aspect ratio kept, resized (bilinear) to the largest grid of whole
      `patch_size` patches with at most `max_num_patches` of them, cut into patches: uint8 (max_num_patches,
      patch_size * patch_size * 3) in `Siglip2ImageProcessor`'s order (rows of patches, channels fastest), the
      unused tail zero, with the grid's (rows, columns) beside it.
    """

    resize: str = "crop"
    size: int = 224
    patch_size: int = 16
    max_num_patches: int = 256

    @property
    def patches(self) -> bool:
        return self.resize == "patches"

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        if self.patches:
            return (self.max_num_patches, self.patch_size * self.patch_size * 3)
        return (self.size, self.size, 3)

    def resized(self, size: int | None) -> ImageLayout:
        """The same layout at another side (augmentation caches training images larger); patches have no side."""
        return self if size is None or self.patches else replace(self, size=size)


def as_layout(layout: ImageLayout | int) -> ImageLayout:
    """An `ImageLayout`; a bare int is CLIP's crop at that side."""
    return layout if isinstance(layout, ImageLayout) else ImageLayout("crop", layout)


def cached_features(layout: ImageLayout | int, cache_format: str = "uint8", more_captions: bool = False):
    """The cache's columns; `more_captions`: also each row's other captions (a source with caption lists), as
    text, token ids and caption ids, beside the first caption's."""
    layout = as_layout(layout)
    if cache_format == "jpeg":  # one JPEG per row (empty for a skipped row), decoded per batch
        pixels = {"pixel_values": datasets.Value("binary")}
    elif layout.patches:  # (patches, patch values), fixed-size both ways, and the grid
        count, width = layout.pixel_shape
        pixels = {
            "pixel_values": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"), length=width), length=count),
            "spatial_shapes": datasets.Sequence(datasets.Value("int32"), length=2),
        }
    else:
        pixels = {"pixel_values": datasets.Sequence(datasets.Value("uint8"), length=math.prod(layout.pixel_shape))}
    return datasets.Features(
        {
            **pixels,
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "caption": datasets.Value("string"),
            "caption_id": datasets.Value("int64"),
            "label": datasets.Value("string"),
            "source_row": datasets.Value("int64"),
            "skip_reason": datasets.Value("string"),
            **(MORE_CAPTION_FEATURES if more_captions else {}),
        }
    )


MORE_CAPTION_FEATURES = {
    "more_captions": datasets.List(datasets.Value("string")),
    "more_input_ids": datasets.List(datasets.List(datasets.Value("int32"))),
    "more_caption_ids": datasets.List(datasets.Value("int64")),
}


def caption_id(input_ids) -> int:
    """A signed 64-bit hash (BLAKE2b) of a caption's token ids, as the text tower reads them (after the tokenizer's
    normalisation and the truncation): two captions the model cannot tell apart get one id, so the loss never makes
    one text both a positive and a negative of an image. Two different captions share an id with probability about
    n^2 / 2^65 for n distinct captions (3e-8 for a million)."""
    data = np.asarray(input_ids, dtype=np.int32).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def load_rgb_image(source: str | dict, image_size: int, *, draft: bool = True, square: bool = False) -> np.ndarray:
    """Decode, convert to RGB, resize the shortest edge to `image_size` (bicubic) and centre-crop: (S, S, 3) uint8.
    With `square` (SigLIP's processor), resize to S x S (bicubic) without a crop instead.

    `draft` lets libjpeg downscale while decoding (2-3x faster on product photos); it never goes below the
    requested size, so the final bicubic resize sees at least as many pixels as it outputs, but for a JPEG at
    least twice the model's resolution the pixels differ from `CLIPProcessor`'s. Training uses it; evaluation
    splits are decoded in full (`draft=False`), so reported recall is what users get at inference.
    """
    image, _ = _decode(source, (lambda width, height: (image_size, image_size)) if draft else None)
    if square:
        return np.asarray(image.resize((image_size, image_size), Image.Resampling.BICUBIC), dtype=np.uint8)
    width, height = image.size
    # Same arithmetic as CLIPImageProcessor (long edge = int(size * long / short)), so training sees the pixels
    # that CLIPProcessor gives users at inference.
    if width <= height:
        resized = (image_size, int(image_size * height / width))
    else:
        resized = (int(image_size * width / height), image_size)
    if resized != image.size:  # (PIL's resize to the same size is a copy: an image already at size is kept)
        image = image.resize(resized, Image.Resampling.BICUBIC)
    if resized != (image_size, image_size):
        left, top = (resized[0] - image_size) // 2, (resized[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def load_patches(source: str | dict, patch_size: int, max_num_patches: int, *, draft: bool = True):
    """SigLIP 2's NaFlex pixels: ((max_num_patches, patch_size * patch_size * 3) uint8, (rows, columns)); see
    `ImageLayout`. `draft` as in `load_rgb_image`, never below the target size."""

    def target_size(width: int, height: int) -> tuple[int, int]:  # (width, height), from the file's own size
        return naflex_size(height, width, patch_size, max_num_patches)[::-1]

    image, original = _decode(source, target_size if draft else None)
    width, height = target_size(*original)
    array = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    rows, columns = height // patch_size, width // patch_size
    patches = array.reshape(rows, patch_size, columns, patch_size, 3).transpose(0, 2, 1, 3, 4)
    out = np.zeros((max_num_patches, patch_size * patch_size * 3), np.uint8)
    out[: rows * columns] = patches.reshape(rows * columns, -1)
    return out, (rows, columns)


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """(height, width) in whole patches, at most `max_num_patches` of them, aspect ratio kept: the largest scale
    found by the binary search `Siglip2ImageProcessor` runs (same arithmetic, so the same sizes)."""

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size) <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


def _decode(source: str | dict, draft_size=None) -> tuple[Image.Image, tuple[int, int]]:
    """Open and decode an image (a path, or a `datasets` Image dict) to RGB; returns it and the file's own (width,
    height). `draft_size(width, height)` gives the least size the JPEG decoder may downscale to."""
    if isinstance(source, dict):
        source = io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    with warnings.catch_warnings():
        # Above Image.MAX_IMAGE_PIXELS PIL only warns (it raises at twice that); a catalogue photo that large is
        # far more likely a decompression bomb than a product, so treat the warning as a bad row too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(source)
    with image:
        original = image.size
        if draft_size is not None:
            image.draft("RGB", draft_size(*original))
        image = to_rgb(image)
        image.load()  # decode now, while the file is open
    return image, original


def load_pixels(source: str | dict, layout: ImageLayout, *, draft: bool = True):
    """What the cache holds for one image: (pixels in `layout.pixel_shape`, the patch grid or None)."""
    if layout.patches:
        return load_patches(source, layout.patch_size, layout.max_num_patches, draft=draft)
    return load_rgb_image(source, layout.size, draft=draft, square=layout.resize == "square"), None


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
        layout: ImageLayout | int,
        max_length: int,
        draft: bool = True,
        require_captions: bool = True,
        cache_format: str = "uint8",
    ) -> None:
        self.tokenizer = tokenizer
        self.layout = as_layout(layout)
        self.max_length = max_length
        self.draft = draft
        self.require_captions = require_captions  # False: images alone (an image folder to embed)
        self.cache_format = cache_format  # "jpeg": each image re-encoded (the compact cache)

    def __call__(self, batch: dict) -> dict:
        pixels, grids, reasons = [], [], []
        problems = batch.get("problem") or [None] * len(batch["image"])  # (found by the source's reader)
        rows = zip(batch["image"], batch["caption"], batch["label"], problems, strict=True)
        for image, caption, label, problem in rows:
            reason = problem or ""
            if not reason and self.require_captions and caption is None:
                reason = "no caption (null)"
            if not reason and self.require_captions and not caption.strip():
                reason = "empty caption"
            if not reason and label is not None and not label.strip():  # None: the source has no labels
                reason = "empty class label"
            if not reason and image is None:  # (a shard row without its image member, a null image cell)
                reason = "no image"
            array, grid = None, (0, 0)
            if not reason:
                try:
                    array, grid = load_pixels(image, self.layout, draft=self.draft)
                except IMAGE_ERRORS as error:
                    reason = f"unreadable image: {type(error).__name__}: {error}"
            if self.cache_format == "jpeg":
                pixels.append(b"" if array is None else encode_jpeg(array))
            else:
                array = np.zeros(self.layout.pixel_shape, np.uint8) if array is None else array
                pixels.append(array if self.layout.patches else array.reshape(-1))
            grids.append(grid)
            reasons.append(reason)
        captions = [caption or "" for caption in batch["caption"]]
        input_ids = self._tokens(captions)
        return {
            "pixel_values": pixels,
            **({"spatial_shapes": grids} if self.layout.patches else {}),
            "input_ids": input_ids,
            "caption": captions,
            "caption_id": [caption_id(ids) for ids in input_ids],
            "label": [label or "" for label in batch["label"]],
            "source_row": batch["source_row"],
            "skip_reason": reasons,
            **(self._more_captions(batch["more_captions"]) if "more_captions" in batch else {}),
        }

    def _tokens(self, captions: list[str]) -> list[list[int]]:
        # Truncation keeps the end-of-text token, which is where CLIP pools the text tower.
        return self.tokenizer(captions, truncation=True, max_length=self.max_length)["input_ids"] if captions else []

    def truncated(self, captions: list[str], input_ids: list[list[int]]) -> CaptionTruncation:
        """How many of `captions` (tokenized to `input_ids` by this preprocessor) the truncation cut."""
        return count_truncated(self.tokenizer, self.max_length, captions, [len(ids) for ids in input_ids])

    def _more_captions(self, lists: list) -> dict:
        """Each row's other captions, tokenized in one call: `more_input_ids` and `more_caption_ids` per row."""
        lists = [captions or [] for captions in lists]
        flat = self._tokens([caption for captions in lists for caption in captions])
        bounds = np.cumsum([0] + [len(captions) for captions in lists])
        tokens = [flat[start:stop] for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
        return {
            "more_captions": lists,
            "more_input_ids": tokens,
            "more_caption_ids": [[caption_id(ids) for ids in row] for row in tokens],
        }


@dataclass(frozen=True)
class CaptionTruncation:
    """How many of a split's captions (every caption of its usable rows, the `more_*` ones included) were longer
    than the `max_length` tokens the text tower reads, and so were cut there."""

    truncated: int
    captions: int
    max_length: int

    def __add__(self, other: CaptionTruncation) -> CaptionTruncation:
        return CaptionTruncation(self.truncated + other.truncated, self.captions + other.captions, self.max_length)

    def as_dict(self) -> dict:
        return {"truncated": self.truncated, "captions": self.captions, "max_tokens": self.max_length}

    def describe(self, role: str, hint: str = "") -> str:
        """The start-up line: "train: 312 of 12,000 captions longer than 77 tokens were truncated" (and `hint`)."""
        line = f"{role}: {self.truncated:,} of {self.captions:,} captions longer than {self.max_length} tokens were"
        return f"{line} truncated{f' ({hint})' if hint and self.truncated else ''}"


def count_truncated(tokenizer, max_length: int, captions: list[str], lengths) -> CaptionTruncation:
    """How many of `captions`, tokenized with truncation to `lengths` tokens, the truncation at `max_length` cut."""
    at_limit = [caption for caption, length in zip(captions, lengths, strict=True) if length >= max_length]
    return CaptionTruncation(_longer(tokenizer, max_length, at_limit), len(captions), max_length)


def _longer(tokenizer, max_length: int, at_limit: list[str]) -> int:
    """How many of `at_limit` (captions cut to `max_length` tokens, or exactly that long) are longer whole. Only
    a caption at the limit can have been cut, so only those are tokenized again: the count is exact, and costs
    nothing where no caption is that long."""
    return sum(len(ids) > max_length for ids in tokenizer(at_limit, verbose=False)["input_ids"]) if at_limit else 0


def cached_truncation(cached: datasets.Dataset, tokenizer, max_length: int) -> CaptionTruncation:
    """`count_truncated` over a preprocessing cache's usable rows, all their captions, read back from the cache
    (each caption's text and token count): a cache hit reports what the pass that wrote it cut, and the cache
    holds nothing more for it (byte for byte what it held before the count)."""
    table = cached.flatten_indices().data.table if cached._indices is not None else cached.data.table
    usable = pc.equal(table.column("skip_reason"), "")
    columns = [(table.column("caption").filter(usable), table.column("input_ids").filter(usable))]
    if "more_input_ids" in table.column_names:  # (a row's other captions, flattened: one entry per caption)
        more = (table.column("more_captions"), table.column("more_input_ids"))
        columns.append(tuple(pc.list_flatten(column.filter(usable)) for column in more))
    captions, at_limit = 0, []
    for texts, token_lists in columns:
        captions += len(texts)
        at_limit += texts.filter(pc.greater_equal(pc.list_value_length(token_lists), max_length)).to_pylist()
    return CaptionTruncation(_longer(tokenizer, max_length, at_limit), captions, max_length)


def encode_jpeg(array: np.ndarray) -> bytes:
    """(S, S, 3) uint8 -> the compact cache's JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def decode_jpeg(data, out: np.ndarray) -> None:
    """The compact cache's bytes (any buffer) decoded into `out` (S, S, 3) uint8."""
    with Image.open(io.BytesIO(data)) as image:
        out[...] = np.asarray(image.convert("RGB"))


def jpeg_shape(data) -> tuple[int, int, int]:
    """(height, width, 3) of the compact cache's bytes, without decoding them."""
    with Image.open(io.BytesIO(data)) as image:
        return (image.height, image.width, 3)


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
    layout: ImageLayout | int,
    cache_dir: str,
    num_proc: int = 1,
    *,
    draft: bool = True,
    require_captions: bool = True,
    max_length: int = MAX_TEXT_TOKENS,
    cache_format: str = "uint8",
) -> datasets.Dataset:
    """Decode and tokenize one split through `datasets.map`, reusing the cache when nothing changed. `layout`: the
    family's pixels (an int: CLIP's at that side). `draft`: the fast JPEG decode (training), or the processor's
    exact pixels (evaluation splits). Without `require_captions` an empty caption is not a reason to skip the row
    (images to embed). Captions are cut at `max_length` tokens (the text tower's; the tokenizer's own limit if
    lower). `cache_format`: "uint8" (the pixels as they are) or "jpeg" (each re-encoded once: ~10x smaller, decoded
    per batch; not for SigLIP 2's patches)."""
    layout = as_layout(layout)
    if cache_format == "jpeg" and layout.patches:
        raise UserError(
            "--cache_format jpeg stores square images; SigLIP 2's patch sequences are cached as uint8 only. Drop "
            "--cache_format jpeg (or start from a CLIP or SigLIP checkpoint)."
        )
    max_length = min(tokenizer.model_max_length, max_length)
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                PREPROCESS_VERSION,
                raw.fingerprint,
                layout.size,
                max_length,
                tokenizer_fingerprint(tokenizer),
                draft,
                *([] if require_captions else ["captions optional"]),
                # (the layout's name only when it is not CLIP's, so caches written before it was a key still count)
                *([] if layout.resize == "crop" else [f"{layout.resize} resize"]),
                *([layout.patch_size, layout.max_num_patches] if layout.patches else []),
                *([] if cache_format == "uint8" else [f"{cache_format} cache", JPEG_QUALITY]),
            ]
        ).encode()
    ).hexdigest()[:32]
    function = PairPreprocessor(tokenizer, layout, max_length, draft, require_captions, cache_format)
    if raw.read_elsewhere:  # (a stand-in has no rows to preprocess: its cache is opened, never written)
        function = NotCached(raw.name, cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    with _interruptible(cache_dir):
        return raw.dataset.map(
            function,
            batched=True,
            batch_size=64,
            num_proc=num_proc if num_proc > 1 and len(raw.dataset) >= 2 * num_proc else None,
            remove_columns=raw.dataset.column_names,
            features=cached_features(layout, cache_format, "more_captions" in raw.dataset.column_names),
            cache_file_name=os.path.join(cache_dir, f"{raw.name}-{fingerprint}.arrow"),
            new_fingerprint=fingerprint,
            desc=f"Preprocessing {raw.name} (decoded once, then cached)",
        )


@dataclass(frozen=True)
class NotCached:
    """The `map` function of a split read by another process (`RawSplit.read_elsewhere`): called only when its
    preprocessing cache is not where that process wrote it."""

    split: str
    cache_dir: str

    def __call__(self, batch: dict) -> dict:
        raise RuntimeError(
            f"The preprocessing cache of split {self.split!r} is not in {self.cache_dir}, where the process that "
            "read the split wrote it: give every process of a node the same --cache_dir."
        )


@contextlib.contextmanager
def _interruptible(cache_dir: str):
    """Ctrl-C during the pass ends it as cleanly with worker processes as without, and leaves no partial file.

    A terminal's Ctrl-C reaches every process of the group: `datasets.map`'s pool workers (forked, so they inherit
    this handler) then ignore it and only this process raises KeyboardInterrupt; the pool is terminated on the way
    out. Left alone, each worker raised it too, and `datasets` waiting on their results replaced the interrupt with
    a `TimeoutError` (or hung). The temporary files it writes the cache through (renamed into place only when
    complete) are removed, and the interrupt is raised as one, whatever it became on the way.
    """
    main, interrupted = os.getpid(), []

    def interrupt(signum, frame):
        if os.getpid() == main:
            interrupted.append(signum)
            raise KeyboardInterrupt

    before = set(os.listdir(cache_dir))
    in_main_thread = threading.current_thread() is threading.main_thread()  # (signals are the main thread's)
    previous = signal.signal(signal.SIGINT, interrupt) if in_main_thread else None
    try:
        yield
    except BaseException:
        if not interrupted:
            raise
        # The pool's Manager process (datasets' result queue) outlives an interrupted pass: the generator that
        # would shut it down stays referenced by the traceback, and at exit Python would wait for it forever.
        for child in multiprocess.active_children():
            child.terminate()
            child.join(timeout=5)
        for name in set(os.listdir(cache_dir)) - before:
            if name.startswith("tmp"):  # (tempfile's names: this pass's unfinished cache files)
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(cache_dir, name))
        raise KeyboardInterrupt from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
