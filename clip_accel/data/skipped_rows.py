"""The training rows a stream leaves out (damaged, unreadable, from an unreachable shard), on one process: each
logged at a bounded rate (open_clip's way: an unreachable shard skips thousands), appended to this process's
ledger beside the checkpoints (a checkpoint keeps positions, not a list that grows with every row; a resume reads
every process's ledger back) and reported in OUTPUT/skipped_rows.jsonl at the end."""

from __future__ import annotations

import json
import math
import os

from accelerate.logging import get_logger
from accelerate.utils import gather_object

logger = get_logger(__name__)
LEDGERS = ".skipped_rows"  # OUTPUT's folder of each process's skipped training rows (`ledger_path`)
LOGGED_ONE_BY_ONE = 10  # skipped rows logged one line each (then one line at each power of ten)


def ledger_path(output_dir: str, rank: int) -> str:
    """Where process `rank` appends the training rows it skips (`SkippedRows.ledger`)."""
    return os.path.join(output_dir, LEDGERS, f"process-{rank}.jsonl")


class SkippedRows(dict):
    """where -> reason of every training row left out so far (`label`: the split, as the log lines name it)."""

    def __init__(self, label: str, ledger: str | None = None) -> None:
        super().__init__()
        self.label, self.ledger = label, ledger

    def add(self, where: str, reason: str) -> None:
        """Count, log and keep a skipped row (once: a row met again in a later pass is not new)."""
        if where in self:
            return
        self[where] = reason
        self._log(where, reason)
        if self.ledger is not None:
            os.makedirs(os.path.dirname(self.ledger), exist_ok=True)
            with open(self.ledger, "a") as ledger:
                ledger.write(json.dumps({"where": where, "reason": reason}) + "\n")

    def read_back(self) -> None:
        """Every process's rows skipped so far (the ledgers beside this one): what a resumed run's report goes on
        from."""
        if self.ledger is None or not os.path.isdir(folder := os.path.dirname(self.ledger)):
            return
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as rows:
                for line in rows:
                    if line.endswith("\n"):  # (a line cut short by a kill is not a row)
                        row = json.loads(line)
                        self[row["where"]] = row["reason"]

    def report(self, accelerator, output_dir: str, split_name: str) -> int:
        """Every process's skipped rows, appended to OUTPUT/skipped_rows.jsonl by the main process (this process's
        ledger removed: the report holds them now); returns how many distinct rows were skipped (on every
        process)."""
        skipped = {}
        for rows in gather_object([dict(self)]):
            skipped.update(rows)
        if self.ledger is not None and os.path.isfile(self.ledger):
            os.remove(self.ledger)
        if accelerator.is_main_process:
            with open(os.path.join(output_dir, "skipped_rows.jsonl"), "a") as report:
                for where, reason in sorted(skipped.items()):
                    row = {"split": split_name, "where": f"{self.label} {where}", "reason": reason}
                    report.write(json.dumps(row) + "\n")
            logger.info(
                f"train split {split_name!r} (streamed): {len(skipped)} rows skipped"
                + (" (see skipped_rows.jsonl)" if skipped else "")
            )
        return len(skipped)

    def _log(self, where: str, reason: str) -> None:
        """The first rows one line each, then a line at each power of ten: every one is listed in
        skipped_rows.jsonl at the end."""
        count = len(self)
        if count <= LOGGED_ONE_BY_ONE:
            more = "; further ones are counted at 100, 1,000, ... and all listed in skipped_rows.jsonl"
            logger.warning(f"{self.label} {where} skipped: {reason}" + (more if count == LOGGED_ONE_BY_ONE else ""))
        elif count == 10 ** round(math.log10(count)):
            logger.warning(f"{self.label}: {count:,} rows skipped so far on this process (the last: {where}: {reason})")
