"""Parquet files as a stream's shards (`ParquetShards`): each file one shard, its rows counted from its footer (no
row is read to count them) and read by row groups, the groups before a slot's first row and after its last
skipped, so a process reads about 1/N of a pass's bytes even of one large file (the usual Hub layout: `datasets`
streams a file as one shard and reads it from its start). Local files, or remote ones through `remote.open_shard`
(ranged reads)."""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import pyarrow.parquet as pq

from .remote import open_shard


class ParquetShards:
    """Parquet files, shard s the s-th; rows as dicts of column -> value (an image column's cells as
    `{"bytes", "path"}`, as `datasets` stores them)."""

    cache = None  # (ranged reads: a file's bytes are fetched as its row groups are read)

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self._features = None

    @property
    def num_shards(self) -> int:
        return len(self.files)

    @property
    def features(self) -> datasets.Features:
        """The columns' features, from the first file's schema (its `datasets` metadata where it has it)."""
        if self._features is None:
            with open_shard(self.files[0]) as handle:
                self._features = datasets.Features.from_arrow_schema(pq.ParquetFile(handle).schema_arrow)
        return self._features

    def column_names(self) -> list[str]:
        return list(self.features)

    def image_column(self, name: str) -> bool:
        return isinstance(self.features.get(name), datasets.Image)

    def prefetch(self, shards: list[int]) -> None:
        """(Row groups are read as they are needed.)"""

    def rows(self, shard: int, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """The file's rows `start` to `stop`: only the row groups holding them are read."""
        with open_shard(self.files[shard]) as handle:
            parquet = pq.ParquetFile(handle)
            first = 0  # the group's first row
            for group in range(parquet.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                if stop is not None and first >= stop:
                    return
                if first + size > start:
                    rows = parquet.read_row_group(group).to_pylist()
                    yield from rows[max(start - first, 0) : size if stop is None else min(stop - first, size)]
                first += size

    def counts(self) -> list[int]:
        """Each file's rows, from its footer."""
        counts = []
        for url in self.files:
            with open_shard(url) as handle:
                counts.append(pq.ParquetFile(handle).metadata.num_rows)
        return counts
