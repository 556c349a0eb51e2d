"""`clip-accel search`: text or image queries against an embeddings file (`clip-accel embed`), top K rows by cosine
similarity, printed, and optionally drawn as a contact sheet.

Brute force on the device: one matrix product per chunk of rows and a running top K, exact. A GPU scores a few
million rows per query batch in well under a second, a CPU about a million rows a second per query; beyond a few
million rows, or for many queries a second, move the vectors to an approximate index (FAISS, hnswlib, a vector
database): the parquet file's `image_embedding` column loads into any of them.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageOps

from .config import UserError
from .data.preprocess import IMAGE_ERRORS, load_pixels
from .embedding import Embeddings
from .model import ContrastiveModel, PixelNormalizer, image_layout, load_pretrained, nested_embeddings
from .zero_shot import embed_texts

CHUNK_ROWS = 1 << 20


@dataclass
class Hit:
    rank: int
    row: int
    score: float
    id: str
    caption: str | None
    image: str | None


def top_k(rows: torch.Tensor, queries: torch.Tensor, k: int, chunk_rows: int = CHUNK_ROWS):
    """(scores, row indices), each (Q, min(k, N)), best first: exact cosine top K of L2-normalised `queries`
    (Q, D) against `rows` (N, D), a chunk of rows at a time (memory O(Q x chunk), not O(Q x N))."""
    k = min(k, rows.shape[0])
    best_scores = torch.full((queries.shape[0], 0), -torch.inf, device=queries.device)
    best_rows = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = rows[start : start + chunk_rows].to(queries.device, queries.dtype)
        scores, index = (queries @ chunk.T).topk(min(k, chunk.shape[0]), dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_rows = torch.cat([best_rows, index + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, order)
    return best_scores, best_rows


class QueryEncoder:
    """Embeds text and image queries exactly as `clip-accel embed` embedded the rows (same model, same pixels)."""

    def __init__(self, model_name_or_path: str, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        clip, self.processor = load_pretrained(model_name_or_path)
        self.layout = image_layout(clip, self.processor)
        self.model = ContrastiveModel(clip).to(self.device).eval()
        image_processor = self.processor.image_processor
        self.normalizer = PixelNormalizer(image_processor.image_mean, image_processor.image_std).to(self.device)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return embed_texts(self.model, self.processor.tokenizer, texts, self.device)

    @torch.no_grad()
    def images(self, paths: list[str]) -> torch.Tensor:
        pixels, grids = [], []
        for path in paths:
            try:
                array, grid = load_pixels(path, self.layout, draft=False)
            except IMAGE_ERRORS as error:
                raise UserError(f"Query image {path} does not open: {type(error).__name__}: {error}") from error
            pixels.append(torch.from_numpy(array))
            grids.append(grid)
        batch = {"pixel_values": torch.stack(pixels).to(self.device)}
        if self.layout.patches:
            batch["spatial_shapes"] = torch.tensor(grids, device=self.device)
        return self.model(**self.normalizer.inputs(batch))[0]


def search(embeddings: Embeddings, queries: torch.Tensor, k: int = 5, against: str = "image") -> list[list[Hit]]:
    """The top `k` rows for each query embedding, by cosine similarity with the rows' image (or text) embeddings.
    The queries are cut to the file's size (`clip-accel embed --dim`: their first dimensions, renormalised)."""
    rows = embeddings.image_embeds if against == "image" else embeddings.text_embeds
    if rows is None:
        raise UserError("This embeddings file has no text embeddings (an image folder): search --against image.")
    if queries.shape[1] < embeddings.dim:
        raise UserError(
            f"The queries are {queries.shape[1]}-dimensional, the file's rows {embeddings.dim}-dimensional: embed the "
            "queries with the model the file was written with (--model_name_or_path)."
        )
    scores, indices = top_k(rows, nested_embeddings(queries.float(), embeddings.dim), k)
    return [
        [
            Hit(rank, row, score, embeddings.ids[row], embeddings.captions[row], embeddings.images[row])
            for rank, (row, score) in enumerate(zip(row_ids.tolist(), row_scores.tolist(), strict=True), start=1)
        ]
        for row_scores, row_ids in zip(scores.cpu(), indices.cpu(), strict=True)
    ]


def format_hits(query: str, hits: list[Hit]) -> str:
    lines = [f"query: {query}"]
    for hit in hits:
        caption = "" if hit.caption is None else f"  {hit.caption}"
        lines.append(f"  {hit.rank:>2}. {hit.score:.4f}  {hit.id}{caption}")
    return "\n".join(lines)


def contact_sheet(results: list[tuple[str, list[Hit]]], path: str, thumb: int = 128) -> str:
    """A PNG: one row per query (its text, or its image, first), then its hits' images with rank, score and id."""
    columns = 1 + max(len(hits) for _, hits in results)
    cell_w, cell_h = thumb + 16, thumb + 56
    sheet = Image.new("RGB", (columns * cell_w, len(results) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (query, hits) in enumerate(results):
        top = row * cell_h
        _paste(sheet, draw, query, (8, top + 8), thumb, label="\n".join(textwrap.wrap(query, 20)[:6]))
        for column, hit in enumerate(hits, start=1):
            left = column * cell_w + 8
            _paste(sheet, draw, hit.image, (left, top + 8), thumb)
            label = f"{hit.rank}. {hit.score:.3f}\n{textwrap.shorten(hit.id, 22, placeholder='...')}"
            draw.text((left, top + thumb + 12), label, fill="black")
    sheet.save(path, format="PNG")
    return path


def _paste(sheet, draw, image_path: str | None, corner: tuple[int, int], thumb: int, label: str | None = None) -> None:
    """The image at `image_path` as a thumbnail at `corner`; a query text (or a missing image) as text instead."""
    try:
        with Image.open(image_path) as image:
            sheet.paste(ImageOps.contain(image.convert("RGB"), (thumb, thumb)), corner)  # small images enlarged
            return
    except (*IMAGE_ERRORS, TypeError, AttributeError):
        pass
    draw.rectangle([corner, (corner[0] + thumb, corner[1] + thumb)], outline="grey")
    draw.text((corner[0] + 4, corner[1] + 4), label or "(no image)", fill="black")
