"""The documentation is run: README.md and every page of docs/.

Each ```bash or ```python block carries a marker, an HTML comment on the line before its fence (invisible on
GitHub, the Hub and the package index):

    <!-- docs: run -->           the block runs as written, in a fresh folder holding links to scripts/ and
                                 accelerate_configs/, on the demo data. A page's runnable blocks run in order in
                                 one folder, so a later block sees what an earlier one wrote (outputs/demo).
    <!-- docs: run OPTIONS -->   the same, with OPTIONS appended to each training command line of the block (the
                                 substitution syntax: e.g. `--num_train_epochs 1`; a later option wins).
    <!-- docs: parse -->         the block needs a GPU, the Hub or real data: each clip_accel command line in it
                                 has its exact option list parsed by the project's own parsers, which reject an
                                 unknown option or a bad value (`--help` would not: argparse exits 0 on it).
                                 Paths under /data/ are read as the demo catalogue; options shown in [brackets]
                                 are parsed too.
    <!-- docs: skip REASON -->   not checked here (the quick start's install-and-test lines, which CI runs).

A page whose first runnable blocks are another page's, word for word (embed-and-search.md and publishing.md both
train the demo into outputs/demo), starts from a copy of the folder those blocks left on the page that ran them
first in this session, instead of training the same demo again: the same commands, from the same fresh folder.

Cost: the runnable blocks add about 1.5 minutes to the suite (training.md 39 s, embed-and-search.md 34 s,
publishing.md 10 s with the demo trained once, the rest under 8 s each).

A block without a language is output, not code. Every relative link of README.md, BENCHMARKS.md and docs/
(file and #anchor) must resolve.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from clip_accel.cli import COMMANDS
from clip_accel.options import parse_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, ROOT / "BENCHMARKS.md"]
MARKER = re.compile(r"<!-- docs: (run|parse|skip)\b\s*(.*?)\s*-->")
TRAINING = ("scripts/train.py", "clip_accel train", "clip-accel train")
SCRIPTS = {"train": "train", "evaluate": "evaluate", "push_to_hub": "push", "reproduce_table": "reproduce"}
SCRIPTS.update(embed="embed", search="search")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    mode: str | None  # run, parse or skip; None when unmarked
    options: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    lines, blocks, index = page.read_text().splitlines(), [], 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if fence is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.search(before)
        mode, options = (marker.group(1), marker.group(2)) if marker else (None, "")
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(page, index + 1, fence.group(1), code, mode, options))
        index = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page) if block.language in ("bash", "python")]


def command_lines(code: str) -> list[str]:
    """The block's logical lines: continuations joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def with_options(code: str, options: str) -> str:
    """`code` with OPTIONS appended to each training command line (before a trailing comment)."""
    if not options:
        return code
    lines = []
    for line in code.replace("\\\n", " ").splitlines():
        if any(marker in line for marker in TRAINING):
            command, hash_, comment = line.partition("  #")
            line = f"{command.rstrip()} {options}" + (f"  #{comment}" if hash_ else "")
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_every_code_block_is_marked_run_parse_or_skip():
    unmarked = [str(block) for block in BLOCKS if block.mode is None]
    assert not unmarked, f"code blocks without a <!-- docs: run|parse|skip --> marker: {unmarked}"
    assert {block.mode for block in BLOCKS} == {"run", "parse", "skip"}


RUNNABLE_PAGES = sorted({block.page for block in BLOCKS if block.mode == "run"})


def runnable_blocks(page: Path) -> list[Block]:
    return [block for block in BLOCKS if block.page == page and block.mode == "run"]


def what_runs(blocks: list[Block]) -> tuple[tuple[str, str], ...]:
    """What running `blocks` in order in a fresh folder executes: each block's language and code with its options."""
    return tuple((block.language, with_options(block.code, block.options)) for block in blocks)


# The runs of first blocks that two or more pages share, word for word: kept after the first page that runs them.
SHARED_STARTS = {
    start
    for start, pages in Counter(
        what_runs(runnable_blocks(page)[:count])
        for page in RUNNABLE_PAGES
        for count in range(1, len(runnable_blocks(page)) + 1)
    ).items()
    if pages > 1
}


@pytest.fixture(scope="module")
def kept_starts() -> dict:
    """{what_runs(first blocks): a copy of the folder they left}, filled as pages run."""
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[page.name for page in RUNNABLE_PAGES])
def test_runnable_blocks_run_on_the_demo_data(page, tmp_path, tmp_path_factory, kept_starts):
    blocks = runnable_blocks(page)
    done = next((count for count in range(len(blocks), 0, -1) if what_runs(blocks[:count]) in kept_starts), 0)
    if done:  # an earlier page ran these very blocks in a fresh folder: go on from a copy of what they left
        shutil.copytree(kept_starts[what_runs(blocks[:done])], tmp_path, symlinks=True, dirs_exist_ok=True)
    else:
        for name in ("scripts", "accelerate_configs"):
            (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for count, block in enumerate(blocks[done:], start=done + 1):
        code = with_options(block.code, block.options)
        command = ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
        ran = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, f"{block} failed:\n{code}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
        if what_runs(blocks[:count]) in SHARED_STARTS:
            kept = tmp_path_factory.mktemp("docs-kept") / "folder"
            shutil.copytree(tmp_path, kept, symlinks=True)
            kept_starts[what_runs(blocks[:count])] = kept


class _Parsed(Exception):
    pass


def parse_command(tokens: list[str], demo_dir: str, monkeypatch) -> None:
    """Parse one clip_accel command line's options with the parser its command uses; other commands (pip, hf,
    python -c) are not ours and pass."""
    tokens = [token.strip("[]") for token in tokens]
    tokens = [demo_dir if token.startswith("/data/") else token for token in tokens]
    if tokens[:2] == ["accelerate", "launch"]:
        if "--config_file" in tokens:
            assert (ROOT / tokens[tokens.index("--config_file") + 1]).is_file()
        script = next((i for i, token in enumerate(tokens) if token.endswith(".py") or token == "-m"), None)
        if script is None:
            return
        tokens = tokens[script:] if tokens[script] != "-m" else ["clip-accel", *tokens[script + 2 :]]
    if tokens[0] in ("sbatch", "bash") and tokens[1].startswith("scripts/slurm/"):  # clip-accel train's options
        assert (ROOT / tokens[1]).is_file()
        tokens = ["clip-accel", "train", *tokens[2:]]
    if tokens[0].startswith("scripts/") and tokens[0].endswith(".py"):
        command, options = SCRIPTS[Path(tokens[0]).stem], tokens[1:]
    elif tokens[0] == "clip-accel":
        command, options = tokens[1], tokens[2:]
    else:
        return
    if command == "train":
        parse_config(options)
        return
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        real(parser, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        COMMANDS[command](options)
    monkeypatch.undo()


PARSED = [block for block in BLOCKS if block.mode == "parse"]


@pytest.mark.parametrize("block", PARSED, ids=[str(block) for block in PARSED])
def test_blocks_that_need_a_gpu_the_hub_or_real_data_parse(block, demo_dir, monkeypatch):
    for line in command_lines(block.code):
        parse_command(shlex.split(line, comments=True), demo_dir, monkeypatch)


def test_a_misspelt_option_in_a_parsed_block_fails(demo_dir, monkeypatch):
    with pytest.raises(ValueError, match="num_train_epocs"):  # (HfArgumentParser raises, argparse exits)
        parse_command(
            shlex.split("accelerate launch scripts/train.py --config demo --num_train_epocs 1"), demo_dir, monkeypatch
        )
    with pytest.raises(ValueError, match="max_stpes"):
        parse_command(
            shlex.split("sbatch scripts/slurm/train.sbatch --config demo --max_stpes 3"), demo_dir, monkeypatch
        )
    with pytest.raises(SystemExit):
        parse_command(shlex.split("clip-accel evaluate --model_name_or_path x --splitt test"), demo_dir, monkeypatch)
    assert (
        with_options("scripts/train.py --config demo  # note\n", "--seed 3")
        == "scripts/train.py --config demo --seed 3  # note\n"
    )


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped except hyphens, spaces to hyphens; repeats get -1,
    -2, ..."""
    found, seen = set(), {}
    fenced = False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        heading = re.match(r"^#{1,6} (.*)", line)
        if fenced or heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_every_relative_link_and_anchor_resolves():
    dead = []
    for page in LINKED:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                dead.append(f"{page.relative_to(ROOT)}: {target}")
    assert not dead, f"dead links: {dead}"
