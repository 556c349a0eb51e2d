"""Evaluation cost: time and peak extra memory of recall@K (clip_accel.metrics.retrieval_metrics).

Synthetic 512-d L2-normalised embeddings (texts = images + noise, so ranks spread over the whole range), both
directions, R@1/5/10 + mean/median rank. Each measurement runs in a fresh process so its peak memory is its own;
"extra peak" is the highest RSS seen during the call (sampled every 5 ms) minus the RSS just before it.

"previous" is the implementation this package had before the one-pass version (git b5aac05): one row-chunked
pass per direction, counting a bool mask. It is kept here, verbatim in behaviour, as the baseline; both must
give identical metrics. `retrieval_metrics` with captions (also R@K when any identical caption counts as a match,
from the same pass), which is what evaluation computes when it has the captions, is timed too.

    python benchmarks/recall.py            # N = 7,500 and 100,000 (previous: 7,500 only)
    python benchmarks/recall.py --quick    # N = 7,500 and 20,000
    python benchmarks/recall.py --previous-sizes 7500 100000   # also time the previous one at 100k (~4 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import common
import psutil  # noqa: E402  (after common: environment set up first)
import torch  # noqa: E402

from clip_accel.metrics import retrieval_metrics  # noqa: E402

DIM = 512
KS = (1, 5, 10)
NAMES = {
    "previous": "previous retrieval_metrics",
    "clip_accel": "clip_accel retrieval_metrics",
    "identical_captions": "clip_accel retrieval_metrics with captions: both rules, one pass (30 % repeated titles)",
}


@torch.no_grad()
def previous_positive_ranks(query: torch.Tensor, candidate: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """The previous implementation: rows of S = query @ candidate.T in chunks, count s_ij >= s_ii with a bool mask."""
    n = query.shape[0]
    cand_t = candidate.T
    ranks = torch.empty(n, dtype=torch.long)
    mask = torch.empty((min(chunk_size, n), n), dtype=torch.bool)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        scores = query[start:end] @ cand_t
        rows = torch.arange(end - start)
        positives = scores[rows, rows + start].unsqueeze(1)
        hits = torch.ge(scores, positives, out=mask[: end - start])
        count = hits.sum(dim=1, dtype=torch.int32).long() - 1
        ranks[start:end] = torch.where(positives.squeeze(1).isnan(), n - 1, count)
    return ranks


def previous_retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, chunk_size: int) -> dict:
    metrics = {}
    for name, (query, cand) in {
        "image_to_text": (image_embeds, text_embeds),
        "text_to_image": (text_embeds, image_embeds),
    }.items():
        ranks = previous_positive_ranks(query, cand, chunk_size)
        for k in KS:
            metrics[f"{name}_R@{k}"] = float((ranks < k).double().mean())
        metrics[f"{name}_mean_rank"] = float((ranks + 1).double().mean())
    return metrics


def synthetic_embeddings(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n, DIM, generator=generator), dim=1)
    texts = torch.nn.functional.normalize(images + 0.3 * torch.randn(n, DIM, generator=generator), dim=1)
    return images, texts


class PeakRss:
    """Samples this process's RSS every 5 ms while the block runs."""

    def __enter__(self):
        self.process = psutil.Process()
        self.baseline = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def measure_in_this_process(implementation: str, n: int, chunk_size: int) -> dict:
    images, texts = synthetic_embeddings(n)
    captions = [f"title {index % (n * 7 // 10)}" for index in range(n)]  # 30 % of the titles repeat
    with PeakRss() as memory, common.Stopwatch() as clock:
        if implementation == "clip_accel":
            metrics = retrieval_metrics(images, texts, ks=KS, chunk_size=chunk_size)
        elif implementation == "identical_captions":
            # What evaluation runs when it has the captions: own-pair and identical-caption figures, one pass.
            metrics = retrieval_metrics(images, texts, ks=KS, chunk_size=chunk_size, captions=captions)
            metrics = {**metrics, **{f"lenient_{k}": v for k, v in metrics.pop("identical_caption_match").items()}}
        else:
            metrics = previous_retrieval_metrics(images, texts, chunk_size)
    return {"seconds": clock.seconds, "extra_mb": memory.extra_mb, "metrics": metrics}


def matmul_flops_per_second() -> float:
    """float32 matmul speed on the tiles pair_ranks multiplies (median of 20)."""
    images, texts, out = torch.randn(2048, DIM), torch.randn(2048, DIM), torch.empty(2048, 2048)
    torch.mm(images, texts.T, out=out)
    seconds = []
    for _ in range(20):
        start = time.perf_counter()
        torch.mm(images, texts.T, out=out)
        seconds.append(time.perf_counter() - start)
    return 2 * 2048 * 2048 * DIM / common.median(seconds)


def measure(implementation: str, n: int, chunk_size: int) -> dict:
    """Run one measurement in a fresh Python process (clean peak memory) and return its JSON result."""
    command = [sys.executable, __file__, "--child", implementation, str(n), str(chunk_size)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 7,500 and 20,000 only.")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="N values for clip_accel.")
    parser.add_argument(
        "--previous-sizes",
        type=int,
        nargs="*",
        default=None,
        help="N values for the previous implementation (default: the smallest size only).",
    )
    parser.add_argument("--chunk-size", type=int, default=2048, help="clip_accel tile side (default 2048).")
    parser.add_argument(
        "--identical-caption-sizes",
        type=int,
        nargs="*",
        default=None,
        help="N values for identical_caption_metrics, which evaluation adds when it has the captions (default: "
        "the clip_accel sizes).",
    )
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "N", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        implementation, n, chunk_size = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(measure_in_this_process(implementation, n, chunk_size)))
        return

    sizes = args.sizes or ([7_500, 20_000] if args.quick else [7_500, 100_000])
    previous_sizes = args.previous_sizes if args.previous_sizes is not None else sizes[:1]
    print(f"Machine: {common.machine_description()}\n")
    runs = [("previous", n, 1024) for n in previous_sizes] + [("clip_accel", n, args.chunk_size) for n in sizes]
    # The evaluation path with captions.
    identical_sizes = args.identical_caption_sizes if args.identical_caption_sizes is not None else sizes
    runs += [("identical_captions", n, args.chunk_size) for n in identical_sizes]
    results = {}
    rows = []
    order = {"previous": 0, "clip_accel": 1, "identical_captions": 2}
    for implementation, n, chunk_size in sorted(runs, key=lambda run: (run[1], order[run[0]])):
        result = measure(implementation, n, chunk_size)
        results[implementation, n] = result
        metrics = result["metrics"]
        if implementation == "previous":
            bound = f"{chunk_size} x N x 5 B = {chunk_size * n * 5 / 2**20:.0f} MB"
        else:
            bound = f"2 x {chunk_size}^2 floats = {2 * chunk_size**2 * 4 / 2**20:.0f} MB"
        mean_ranks = [
            f"{metrics[f'{d}_mean_rank']:.1f}" if f"{d}_mean_rank" in metrics else "-"
            for d in ("image_to_text", "text_to_image")
        ]
        rows.append(
            [
                NAMES[implementation],
                f"{n:,}",
                chunk_size,
                round(result["seconds"], 1),
                round(result["extra_mb"]),
                bound,
                f"{metrics['image_to_text_R@1']:.4f}",
                f"{metrics['text_to_image_R@1']:.4f}",
                *mean_ranks,
            ]
        )
    print(
        common.markdown_table(
            [
                "implementation",
                "N pairs",
                "chunk",
                "time (s)",
                "extra peak RSS (MB)",
                "working memory by design",
                "I2T R@1",
                "T2I R@1",
                "I2T mean rank",
                "T2I mean rank",
            ],
            rows,
        )
    )
    for n in sorted({n for _, n in results}):
        if ("previous", n) in results and ("clip_accel", n) in results:
            new, old = results["clip_accel", n]["metrics"], results["previous", n]["metrics"]
            same = all(new[key] == old[key] for key in old)
            speedup = results["previous", n]["seconds"] / results["clip_accel", n]["seconds"]
            print(
                f"\nN = {n:,}: clip_accel metrics {'identical to' if same else 'DIFFER from'} the previous "
                f"implementation's; {speedup:.2f}x faster."
            )
    targets = {name: results.get((name, 100_000)) for name in ("clip_accel", "identical_captions")}
    for n in sorted({n for _, n in results}):
        if ("identical_captions", n) in results and ("clip_accel", n) in results:
            extra = results["identical_captions", n]["seconds"] / results["clip_accel", n]["seconds"]
            print(
                f"N = {n:,}: with the identical-caption figures (what evaluation computes when it has the "
                f"captions) retrieval_metrics takes {extra:.2f}x the time it takes without them."
            )
    rate = matmul_flops_per_second()
    for n in sorted({n for _, n in results}):
        print(
            f"N = {n:,}: the similarity matmul alone (2 N^2 D = {2 * n * n * DIM / 1e12:.2f} TFLOP) takes "
            f"{2 * n * n * DIM / rate:.0f} s at this machine's {rate / 1e9:.0f} GFLOP/s (float32, 2048 x 512 x 2048 "
            "tiles): the floor for any exact float32 method here."
        )
    for name, target in targets.items():
        if target:
            verdict = "met" if target["seconds"] < 120 else "MISSED"
            print(
                f"Target ({NAMES[name]}, 100,000 pairs under 120 s with bounded memory): {verdict} "
                f"({target['seconds']:.0f} s, +{target['extra_mb']:.0f} MB)."
            )
    print(f"\nload average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
