"""Evaluation embedding each distinct caption once (by caption id) against embedding every caption beside its image:
the figure behind BENCHMARKS.md section 9.

Data: the demo catalogue with 30 % of its items sharing a title with another photo of the same product
(`write_demo_dataset(shared_titles=0.3)`, as benchmarks/catalogue_loss.py; 200 test pairs at 64 px), and the demo
recipe's tiny CLIP as prepared for training (from scratch: the speed does not depend on the weights). Both ways
score the test split with `evaluation.evaluate_retrieval`, interleaved over rounds in a new order each round;
"beside (A/A)" is the old way timed a second time, the noise floor. The figures both ways are printed too: they
can differ only where identical captions' embeddings differed in their last bits.

    python benchmarks/distinct_captions.py [--rounds 15] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import common
from catalogue_loss import SHARED_TITLES, shared_titles  # noqa: E402

from clip_accel.data.demo import write_demo_dataset  # noqa: E402
from clip_accel.evaluation import evaluate_retrieval  # noqa: E402
from clip_accel.options import parse_config  # noqa: E402
from clip_accel.trainer import prepare_run  # noqa: E402

ROOT = common.BENCH_DIR / "distinct_captions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--markdown", default=None, help="Also write the table to this file.")
    args = parser.parse_args()
    demo = write_demo_dataset(ROOT / "demo", shared_titles=SHARED_TITLES)
    argv = ["--config", "demo", "--demo", "false", "--data_dir", str(demo), "--cache_dir", str(ROOT / "cache")]
    run = prepare_run(*parse_config(argv + ["--output_dir", str(ROOT / "out")]))
    texts = run.texts["test"]

    def score(way: str) -> dict:
        return evaluate_retrieval(
            run.accelerator,
            run.model,
            run.test_loader,
            run.step_context.normalizer,
            captions=run.captions["test"],
            texts=texts if way == "distinct" else None,
        )

    ways = ["distinct", "beside", "beside (A/A)"]
    times = {way: [] for way in ways}
    for way in ways:  # a warm-up of each
        score(way)
    for _ in range(args.rounds):
        for way in random.sample(ways, len(ways)):
            start = time.perf_counter()
            score(way)
            times[way].append(time.perf_counter() - start)
    beside = statistics.median(times["beside"])
    rows = [
        [way, f"{statistics.median(times[way]) * 1000:.1f}", f"{beside / statistics.median(times[way]):.2f}"]
        for way in ways
    ]
    figures = {way: score(way) for way in ("distinct", "beside")}
    keys = ["image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "text_to_image_R@5"]
    lines = [
        f"Test split: {figures['distinct']['num_pairs']} pairs, {shared_titles(demo, 'test')} sharing a title, "
        f"{len(texts.loader.dataset)} distinct captions; {args.rounds} rounds. {common.machine_description()}",
        "",
        common.markdown_table(["Captions embedded", "ms per evaluation (median)", "speed-up over beside"], rows),
        "",
        common.markdown_table(
            ["Captions embedded"] + keys, [[way] + [f"{figures[way][k]:.4f}" for k in keys] for way in figures]
        ),
    ]
    text = "\n".join(lines)
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
