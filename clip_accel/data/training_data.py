"""What the training loop reads, whatever the data is: a cached split through a DataLoader Accelerate prepared, or a
stream (`streaming.StreamingLoader`), made by `training_data()`. The loop never asks which it holds (open_clip's
`DataInfo`, torchtitan's stateful data loader); both answer:

- `len()`: an epoch's batches on this process (the same on every process);
- `epoch(epoch, done)`: epoch `epoch`'s batches after its first `done` (a resumed run's), on the device;
- `taken(batch)`: the loop took this batch (a stream moves its checkpointed position past it);
- `state_dict()` / `load_state_dict(every process's state)`: what a checkpoint keeps of it (None: nothing);
- `identity()`: what a resume must find unchanged (a stream's shards), else None;
- `pairs_per_epoch`, `shared_captions` (None where not counted ahead), `skip_report()` and `caption_truncation()`
  for the logs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

from accelerate import Accelerator

from .hard_negatives import NeighbourSampler
from .loader import PairDataset, make_dataloader
from .skipped_rows import ledger_path
from .streaming import StreamingLoader, StreamingPairs


class CachedTrainingData:
    """A cached split's batches: epoch e in the seeded sampler's order for e, a resumed epoch's first batches skipped
    (Accelerate's `skip_first_batches`); nothing for a checkpoint to keep beyond the epoch and batch counters (a
    `NeighbourSampler`'s neighbours are kept with the model, `CheckpointManager.track`'s `order`)."""

    def __init__(self, loader, accelerator: Accelerator, pairs: PairDataset, sampler: NeighbourSampler | None) -> None:
        self.loader, self.accelerator, self.pairs, self.sampler = loader, accelerator, pairs, sampler
        self.pairs_per_epoch = len(pairs)
        self.shared_captions = pairs.shared_captions()

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, done: int = 0) -> Iterator[dict]:
        if self.sampler is not None:  # (here, in the loop's thread: mining runs the model and its collectives)
            self.sampler.prepare(epoch)
        self.loader.set_epoch(epoch)
        self.pairs.set_epoch(epoch)  # (the caption a row with several trains with)
        if done == 0:
            return iter(self.loader)
        skipping = self.accelerator.skip_first_batches(self.loader, done)
        skipping.set_epoch(epoch)
        return iter(skipping)

    def taken(self, batch: dict) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, states: list) -> None:
        pass

    def identity(self) -> None:
        return None

    def skip_report(self, accelerator: Accelerator, output_dir: str) -> None:
        """(Written at start-up, with the evaluation splits': `data.write_skip_report`.)"""

    def caption_truncation(self, accelerator: Accelerator):
        """The captions cut at the text length (`CaptionTruncation`), counted when the split was preprocessed."""
        return self.pairs.truncation


def training_data(
    accelerator: Accelerator,
    pairs: PairDataset | StreamingPairs,
    batch_size: int,
    num_workers: int,
    output_dir: str | None = None,
    resuming: bool = False,
    sampler: NeighbourSampler | None = None,
) -> CachedTrainingData | StreamingLoader:
    """The training split's batches of `batch_size` pairs per process: a stream reads each process's own rows
    already (not prepared), and appends the rows it skips under `output_dir` (a run that does not resume starts
    that record afresh); a cached split goes through `accelerator.prepare` (its sampler split among the
    processes): a seeded shuffle, or `sampler`'s order (`hard_negatives.NeighbourSampler`)."""
    if isinstance(pairs, StreamingPairs):
        ledger = ledger_path(output_dir, accelerator.process_index) if output_dir is not None else None
        if ledger is not None and not resuming:
            if accelerator.is_local_main_process:  # (node-local output folders: each node its own)
                shutil.rmtree(os.path.dirname(ledger), ignore_errors=True)
            accelerator.wait_for_everyone()
        return StreamingLoader(pairs, batch_size, num_workers=num_workers, device=accelerator.device, ledger=ledger)
    loader = make_dataloader(
        pairs, batch_size, train=True, num_workers=num_workers, device=accelerator.device, sampler=sampler
    )
    return CachedTrainingData(accelerator.prepare(loader), accelerator, pairs, sampler)
