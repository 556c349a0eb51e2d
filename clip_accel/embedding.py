"""`clip-accel embed`: a split (Indo-fashion layout or any `datasets` source) or a folder of images, through a
trained folder or a Hub id, to an embeddings file with row ids; read back by `clip-accel search`.

Splits go through the training pipeline (the preprocessing cache, evaluation's exact `CLIPProcessor` pixels), so
the vectors are those evaluation scored. Every process embeds its share; the rows are gathered in split order
and the main process writes the file. Two formats, chosen by the file's extension:

- `.parquet`: one row per item: `id`, `image` (path, when the image is a file), `caption`, `label`,
  `image_embedding` and `text_embedding` (float32 lists, L2-normalised; no text column for an image folder);
- `.safetensors`: `image_embeds` (N, D) and `text_embeds` (N, D) tensors, the row fields as JSON in the metadata.
Both record the model they came from as it was given (a Hub id, or a folder as named), so a search embeds its
queries with the same model, and the vectors' size (`clip_accel_dim`): with `--dim d` (a model trained with
--matryoshka_dims) each vector is its first d dimensions renormalised, and a search cuts its queries alike. No
absolute path is written: image paths are relative to the data folder, and the data folder (`clip_accel_image_root`)
relative to the file's own folder, so a file moved together with its data folder (to another machine) still finds
its images. Files written before hold absolute image paths, read as they are.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .config import DataConfig, UserError, parse_nested_sizes
from .data import build_pair_datasets, load_raw_splits, make_dataloader, read_image_folder
from .data.sources import data_source_dir
from .evaluation import embed_split, training_eval_batch_size, training_option
from .launch import check_processes, data_prepared_per_node
from .model import (
    ContrastiveModel,
    PixelNormalizer,
    embedding_size,
    image_layout,
    load_pretrained,
    nested_embeddings,
    text_length,
)

logger = logging.getLogger(__name__)
FORMATS = (".parquet", ".safetensors")


@dataclass
class Embeddings:
    """What an embeddings file holds: per row an id, its image path (or None), caption and label (or None), and
    the L2-normalised image (and, with captions, text) embeddings, on the CPU. In memory the image paths open from
    here (absolute, under `image_root`, the data folder when there is one); the file holds them relative to it."""

    ids: list[str]
    images: list[str | None]
    captions: list[str | None]
    labels: list[str | None]
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor | None
    model: str
    image_root: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """The size of the vectors (below the model's with `clip-accel embed --dim`)."""
        return self.image_embeds.shape[1]


def check_output_file(path: str) -> None:
    if not path.endswith(FORMATS):
        raise UserError(f"--output_file {path!r}: name it *.parquet or *.safetensors (the format follows the name).")
    check_writable_file(path, "--output_file")


def check_writable_file(path: str, option: str) -> None:
    """`path` can be written: not a folder, its folder made if missing. Checked before the work, not after it."""
    if os.path.isdir(path):
        raise UserError(f"{option} {path!r} is a folder: name a file in it.")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as error:
        raise UserError(f"{option} {path!r}: its folder cannot be made ({error.strerror or error}).") from None


def embed(
    model_name_or_path: str,
    data_config: DataConfig | None = None,
    *,
    image_folder: str | None = None,
    cache_dir: str | None = None,
    batch_size: int | None = None,
    dim: int | None = None,
) -> Embeddings:
    """Every usable row of `data_config`'s test split (the split to embed), or every image under `image_folder`
    (preprocessed into `cache_dir`), through the model; rows that do not preprocess (unreadable images, empty
    captions) are left out and counted in the log. `dim`: keep each vector's first `dim` dimensions, renormalised
    (None: the model's full size)."""
    accelerator = Accelerator()
    check_processes(accelerator)
    clip, processor = load_pretrained(model_name_or_path)
    dim = _check_dim(dim, clip, model_name_or_path, accelerator.is_main_process)
    module = ContrastiveModel(clip)
    config = data_config if image_folder is None else DataConfig(data_dir=image_folder, cache_dir=cache_dir)
    per_node = data_prepared_per_node(accelerator, config)
    if image_folder is not None:
        with accelerator.main_process_first():
            raw = {"test": read_image_folder(image_folder)}
    else:
        raw = load_raw_splits(accelerator, config, roles=("test",), per_node=per_node)
    pairs = build_pair_datasets(
        accelerator,
        config,
        raw,
        processor.tokenizer,
        image_layout(clip, processor),
        per_node=per_node,
        require_captions=image_folder is None,
        family=module.family,
        text_length=text_length(clip.config),
    )["test"]
    skipped = pairs.skipped_rows()
    if skipped and accelerator.is_main_process:
        first = raw["test"].describe_row(skipped[0]["source_row"])
        logger.warning(f"{len(skipped)} rows left out (first: {first}: {skipped[0]['reason']}).")
    batch_size = batch_size or training_eval_batch_size(model_name_or_path)
    loader = make_dataloader(pairs, batch_size, train=False, device=accelerator.device)
    model, loader = accelerator.prepare(module, loader)
    normalizer = PixelNormalizer(processor.image_processor.image_mean, processor.image_processor.image_std)
    with_text = image_folder is None
    image_embeds, text_embeds = embed_split(
        accelerator, model, loader, normalizer.to(accelerator.device), with_text=with_text, progress=True
    )
    paths = raw["test"].dataset["image"]
    images = [os.path.abspath(paths[row]) if isinstance(paths[row], str) else None for row in pairs.rows]
    # Ids: the image's path inside the folder read (Indo-fashion's image_path), else the split and row.
    folder = image_folder or data_source_dir(config)
    rows = pairs.column("source_row")
    ids = [
        os.path.relpath(image, folder) if image and folder else image or f"{config.test_split}/{row}"
        for image, row in zip(images, rows, strict=True)
    ]
    if image_folder is not None:
        captions = labels = [None] * len(ids)
    else:
        captions, labels = pairs.column("caption"), [label or None for label in pairs.column("label")]
    image_embeds = nested_embeddings(image_embeds, dim).cpu()
    text_embeds = None if text_embeds is None else nested_embeddings(text_embeds, dim).cpu()
    root = os.path.abspath(folder) if folder else None
    return Embeddings(ids, images, captions, labels, image_embeds, text_embeds, model_name_or_path, root)


def _check_dim(dim: int | None, clip, model_name_or_path: str, warn: bool) -> int:
    """--dim against the model's embedding size (which it defaults to); a warning where the run that trained the
    model did not train that size (--matryoshka_dims): its leading dimensions alone may retrieve poorly."""
    width = embedding_size(clip.config.to_dict())
    if dim is None:
        return width
    if not 1 <= dim <= width:
        raise UserError(f"--dim {dim}: this model's embeddings have {width} dimensions; give a size from 1 to {width}.")
    trained = parse_nested_sizes(training_option(model_name_or_path, "matryoshka_dims"))
    if warn and dim < width and dim not in trained:
        logger.warning(
            f"--dim {dim}: {model_name_or_path} was not trained at {dim} dimensions (--matryoshka_dims "
            f"{','.join(map(str, trained)) or 'not set'}); its first {dim} alone may retrieve poorly."
        )
    return dim


def save_embeddings(embeddings: Embeddings, path: str) -> None:
    """Write `embeddings` to `path` (.parquet or .safetensors), atomically (a temporary file renamed into place)."""
    check_output_file(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = f"{path}.partial"
    images, recorded = embeddings.images, {"clip_accel_model": embeddings.model, "clip_accel_dim": str(embeddings.dim)}
    if embeddings.image_root is not None:
        root = embeddings.image_root
        images = [None if image is None else os.path.relpath(image, root) for image in images]
        recorded["clip_accel_image_root"] = os.path.relpath(root, os.path.dirname(os.path.abspath(path)))
    if path.endswith(".parquet"):
        columns = {
            "id": embeddings.ids,
            "image": images,
            "caption": embeddings.captions,
            "label": embeddings.labels,
            "image_embedding": list(embeddings.image_embeds.float().numpy()),
        }
        if embeddings.text_embeds is not None:
            columns["text_embedding"] = list(embeddings.text_embeds.float().numpy())
        table = pa.table(columns).replace_schema_metadata(recorded)
        pq.write_table(table, staging)
    else:
        tensors = {"image_embeds": embeddings.image_embeds.float().contiguous()}
        if embeddings.text_embeds is not None:
            tensors["text_embeds"] = embeddings.text_embeds.float().contiguous()
        rows = {"ids": embeddings.ids, "images": images, "captions": embeddings.captions}
        metadata = {**recorded, "rows": json.dumps({**rows, "labels": embeddings.labels})}
        save_file(tensors, staging, metadata=metadata)
    os.replace(staging, path)


def load_embeddings(path: str) -> Embeddings:
    """Read a file `save_embeddings` wrote, its image paths joined to its data folder (found relative to the file's
    own folder, as recorded)."""
    if not path.endswith(FORMATS):
        raise UserError(
            f"{path} is not an embeddings file: name the *.parquet or *.safetensors file that `clip-accel embed "
            "--output_file` wrote."
        )
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: write it first with `clip-accel embed ... --output_file {path}`.")
    if path.endswith(".parquet"):
        table = pq.read_table(path)
        recorded = (table.schema.metadata or {}).items()
        metadata = {key.decode(): value.decode() for key, value in recorded if key.startswith(b"clip_accel_")}

        def matrix(name: str) -> torch.Tensor | None:
            if name not in table.column_names:
                return None
            return torch.from_numpy(np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float32))

        # The row columns only: the embedding columns go to numpy above, not through Python lists.
        ids, images, captions, labels = (table.column(name).to_pylist() for name in ("id", "image", "caption", "label"))
        image_embeds, text_embeds = matrix("image_embedding"), matrix("text_embedding")
    else:
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
        rows = json.loads(metadata.get("rows", "{}"))
        ids, images, captions, labels = (rows[name] for name in ("ids", "images", "captions", "labels"))
        image_embeds, text_embeds = tensors["image_embeds"], tensors.get("text_embeds")
    root = metadata.get("clip_accel_image_root")  # (absent from older files, whose image paths are absolute)
    if root is not None:
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), root))
        images = [None if image is None else os.path.join(root, image) for image in images]
    model = metadata.get("clip_accel_model", "")
    embeddings = Embeddings(ids, images, captions, labels, image_embeds, text_embeds, model, root)
    recorded_dim = metadata.get("clip_accel_dim")  # (absent from older files: their vectors' size)
    if recorded_dim is not None and int(recorded_dim) != embeddings.dim:
        raise UserError(
            f"{path} records {recorded_dim}-dimensional vectors but holds {embeddings.dim}: write it again."
        )
    return embeddings
