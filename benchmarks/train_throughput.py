"""Training throughput on CPU, side by side in one run: pairs/s of clip_accel against the alternatives.

Same model (a small CLIP at 224 px: width 128, 4 layers per tower, 32 px patches, from the same initial
weights), same batch, same benchmark set (1,000 product-photo-like 240 x 320 JPEGs in the Indo-fashion layout):

- clip_accel: the real trainer path, `prepare_run` + `fit` (its own loader from the preprocessing cache, Accelerate,
  `plain_step`, logging, epoch-end checkpoints), timed per optimizer step through fit's `on_step_end` hook;
- bare PyTorch loop: the same preprocessed tensors held in memory, the same work per step (normalise, forward,
  the trainer's contrastive loss with its default identical-caption positives, backward, clip at 1.0, AdamW,
  schedule, clamp logit_scale), nothing else: the floor;
- transformers.Trainer, the run_clip.py recipe (examples/pytorch/contrastive-image-text): CLIPModel with
  return_loss=True, captions tokenized up front padded to max_length (77, CLIP's context), images decoded and
  transformed on the fly every step through `set_transform`. run_clip.py uses torchvision's read_image +
  Resize/CenterCrop/Normalize; torchvision is not installable beside this CPU torch, so here PIL decodes and
  CLIPImageProcessor (its PIL backend) resizes, crops and normalises;
- open_clip's trainer, when `import open_clip` works (see the output for why it does not here).

Each loop runs in its own thread and only takes the steps the main thread grants it, so the timed windows of all
loops are interleaved, in a new random order every round: load from other processes on this shared machine hits
every loop alike. Reported: median over windows of pairs/s, after one warm-up window per loop. A second, identical
bare loop (A/A control) shows how far two equal loops drift apart on this machine.

    python benchmarks/train_throughput.py              # the comparison table
    python benchmarks/train_throughput.py --quick      # fewer, shorter windows
    python benchmarks/train_throughput.py --ablations  # plus bare-loop variants behind the fast-path proposals
"""

from __future__ import annotations

import argparse
import copy
import os
import queue
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field

import common
import datasets  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,  # noqa: E402
    get_scheduler,  # noqa: E402
)
from transformers.utils import logging as hf_logging  # noqa: E402

from clip_accel.checkpoint import TrainerState, save_checkpoint  # noqa: E402
from clip_accel.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from clip_accel.loss import contrastive_loss  # noqa: E402
from clip_accel.model import ContrastiveModel  # noqa: E402
from clip_accel.step import MAX_LOGIT_SCALE, plain_step  # noqa: E402
from clip_accel.trainer import fit, prepare_run  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY = 5e-4, 0.1


class Gate:
    """Lets a training loop in another thread take exactly the optimizer steps the main thread grants it.

    The loop calls `wait_to_start()` once before its first step and `step_done()` after every optimizer step;
    the main thread calls `window(steps)`, which returns the wall time those steps took (data loading included).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._go = threading.Semaphore(0)
        self._finished = queue.Queue()
        self._left = 0
        self.error: BaseException | None = None

    def wait_to_start(self) -> None:
        self._go.acquire()

    def step_done(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._finished.put(time.perf_counter())
            self._go.acquire()

    def window(self, steps: int) -> float:
        self._left = steps
        start = time.perf_counter()
        self._go.release()
        end = self._finished.get()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed") from self.error
        return end - start

    def release(self) -> None:
        """Let the loop run to its end (its last window is over)."""
        self._go.release()

    def run(self, loop) -> threading.Thread:
        def target():
            try:
                self.wait_to_start()
                loop()
            except BaseException as error:  # surfaced in the main thread by window()
                self.error = error
                self._finished.put(time.perf_counter())

        thread = threading.Thread(target=target, name=self.name, daemon=True)
        thread.start()
        return thread


@dataclass
class Contender:
    name: str
    gate: Gate | None = None
    thread: threading.Thread | None = None
    note: str = ""
    unavailable: str = ""
    seconds: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- clip_accel
def start_clip_accel(
    data_dir: str,
    model_config: str,
    batch_size: int,
    total_steps: int,
    work: str,
    name: str = "clip_accel",
    loop: str = "fit",
    torch_compile: bool = False,
):
    """prepare_run, then in a thread: `fit` (loop="fit") or clip_accel's loader + step function alone
    (loop="steps"). fit() reports every optimizer step to the gate through its `on_step_end` hook."""
    data_config = DataConfig(data_dir=data_dir, cache_dir=os.path.join(work, "cache"), max_eval_samples=100)
    train_config = TrainConfig(
        output_dir=os.path.join(work, name),
        overwrite_output_dir=True,
        per_device_train_batch_size=batch_size,
        max_steps=total_steps,
        eval_steps=total_steps,
        early_stopping_patience=0,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        seed=0,
        torch_compile=torch_compile,
    )
    run = prepare_run(data_config, ModelConfig(scratch_config=model_config), train_config)
    gate = Gate(name)
    if loop == "steps":
        return run, gate, gate.run(step_functions_loop(run, total_steps, gate))
    return run, gate, gate.run(lambda: fit(run, TrainerState(), on_step_end=lambda state: gate.step_done()))


def checkpoint_seconds(run, work: str, repeats: int = 3) -> float:
    """What fit() adds at every epoch end, timed apart (median of `repeats`): a full checkpoint of the run
    (weights, AdamW state, RNG states)."""
    seconds = []
    for step in range(repeats):
        with common.Stopwatch() as clock:
            save_checkpoint(run.accelerator, os.path.join(work, "checkpoint-timing"), TrainerState(step=step), keep=1)
        seconds.append(clock.seconds)
    return common.median(seconds)


def step_functions_loop(run, total_steps: int, gate: Gate):
    """The ablation without fit(): clip_accel's loader and step function only (no logging, no epoch-end
    checkpoint), to split the trainer's cost between its step and its loop."""

    def loop():
        step, epoch = 0, 0
        while True:
            run.model.train()
            for batch in run.train_data.epoch(epoch):
                plain_step(run.step_context, [batch])
                step += 1
                gate.step_done()
                if step == total_steps:
                    return
            epoch += 1

    return loop


# ------------------------------------------------------------------------------------------------- bare PyTorch
@dataclass(frozen=True)
class BareOptions:
    fused_adamw: bool = True  # as the trainer (and the Trainer) use
    attention: str = "sdpa"
    clip_grad: bool = True
    nchw_contiguous: bool = False
    pad_to_77: bool = False
    out_of_place_normalize: bool = False
    compile: bool = False
    # clip_accel's default loss: pairs with identical captions are positives of each other (--caption_positives
    # identical), the same work as the trainer's; False: the own-pair loss, one pass less over the logits.
    caption_positives: bool = True


def in_memory_tensors(pair_dataset) -> tuple:
    """Every training pair at once: uint8 pixels (N, S, S, 3), input_ids (N, L) padded, caption lengths (N,), the
    pad id and the caption ids (N,)."""
    everything = pair_dataset.__getitems__(list(range(len(pair_dataset))))
    input_ids, pad = everything["input_ids"], pair_dataset.pad_token_id
    lengths = (input_ids == pad).int().argmax(dim=1) + 1  # CLIP pads with end-of-text: the first one ends the caption
    return everything["pixel_values"], input_ids, lengths, pad, everything["caption_ids"]


def bare_loop(
    model: CLIPModel, tensors, mean, std, batch_size: int, total_steps: int, gate: Gate, options: BareOptions
):
    pixels, input_ids, lengths, pad, caption_ids = tensors
    shift = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
    scale = 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=options.fused_adamw,
    )
    scheduler = get_scheduler("cosine", optimizer, 0, total_steps)
    generator = torch.Generator().manual_seed(0)

    def loss_of(pixel_values, ids, captions):
        outputs = model(input_ids=ids, pixel_values=pixel_values)
        if options.caption_positives:  # (the trainer's loss function, as the trainer calls it on one process)
            return contrastive_loss(outputs.image_embeds, outputs.text_embeds, model.logit_scale, caption_ids=captions)
        logits = model.logit_scale.exp() * outputs.image_embeds @ outputs.text_embeds.T
        labels = torch.arange(len(logits))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    forward_loss = torch.compile(loss_of) if options.compile else loss_of
    model.train()

    def loop():
        step = 0
        while step < total_steps:
            order = torch.randperm(len(pixels), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):  # drop_last, as clip_accel
                index = order[start : start + batch_size]
                length = 77 if options.pad_to_77 else int(lengths[index].max())
                ids = (
                    input_ids[index, :length]
                    if length <= input_ids.shape[1]
                    else F.pad(input_ids[index], (0, length - input_ids.shape[1]), value=pad)
                )
                if options.out_of_place_normalize:  # clip_accel's PixelNormalizer before 96754c0: 3 float buffers
                    pixel_values = (pixels[index].permute(0, 3, 1, 2).float() - shift) * scale
                else:  # as clip_accel's PixelNormalizer: same arithmetic, in place on one float copy
                    pixel_values = pixels[index].permute(0, 3, 1, 2).to(torch.float32).sub_(shift).mul_(scale)
                if options.nchw_contiguous:
                    pixel_values = pixel_values.contiguous()
                loss = forward_loss(pixel_values, ids, caption_ids[index])
                loss.backward()
                if options.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                step += 1
                gate.step_done()
                if step == total_steps:
                    return

    return loop


# ----------------------------------------------------------------------------------- transformers.Trainer recipe
class GateCallback(TrainerCallback):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def on_step_end(self, args, state, control, **kwargs):
        self.gate.step_done()


def run_clip_datasets(data_dir: str, tokenizer, image_size: int) -> tuple[datasets.Dataset, object]:
    """The run_clip.py data path: load the annotation file, tokenize (pad to max_length) once, decode on the fly."""
    dataset = datasets.load_dataset("json", data_files=os.path.join(data_dir, "train_data.json"), split="train")
    dataset = dataset.map(lambda row: {"image_path": os.path.join(data_dir, row["image_path"])})

    def tokenize_captions(examples):
        text_inputs = tokenizer(examples["product_title"], max_length=77, padding="max_length", truncation=True)
        return {"input_ids": text_inputs.input_ids, "attention_mask": text_inputs.attention_mask}

    dataset = dataset.map(
        tokenize_captions, batched=True, remove_columns=[c for c in dataset.column_names if c != "image_path"]
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )

    def transform_images(examples):
        images = [Image.open(path).convert("RGB") for path in examples["image_path"]]
        examples["pixel_values"] = list(processor(images=images, return_tensors="pt")["pixel_values"])
        return examples

    dataset.set_transform(transform_images)
    return dataset, processor


def run_clip_collate(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "input_ids": torch.tensor([example["input_ids"] for example in examples], dtype=torch.long),
        "attention_mask": torch.tensor([example["attention_mask"] for example in examples], dtype=torch.long),
        "return_loss": True,
    }


class CachedForTrainer(torch.utils.data.Dataset):
    """clip_accel's preprocessed pairs, normalised per item, for the Trainer-over-the-cache ablation."""

    def __init__(self, tensors, mean, std) -> None:
        self.pixels, self.input_ids, self.lengths, _, _ = tensors
        self.shift = torch.tensor(mean).view(3, 1, 1) * 255.0
        self.scale = 1.0 / (255.0 * torch.tensor(std).view(3, 1, 1))

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index):
        pixel_values = (self.pixels[index].permute(2, 0, 1).float() - self.shift) * self.scale
        return {
            "pixel_values": pixel_values,
            "input_ids": self.input_ids[index].tolist(),
            "attention_mask": [1] * self.input_ids.shape[1],
        }


def start_trainer(model: CLIPModel, train_dataset, batch_size: int, total_steps: int, work: str, name: str):
    arguments = TrainingArguments(
        output_dir=os.path.join(work, name),
        per_device_train_batch_size=batch_size,
        max_steps=total_steps,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        adam_beta2=0.98,
        adam_epsilon=1e-6,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    gate = Gate(name)
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        data_collator=run_clip_collate,
        callbacks=[GateCallback(gate)],
    )
    trainer.remove_callback(PrinterCallback)  # it would print the train-summary dict between the tables
    return trainer, gate, gate.run(trainer.train)


# ------------------------------------------------------------------------------------------------------ open_clip
def open_clip_status() -> str:
    """Why open_clip's trainer cannot run here, or "" if it imports."""
    try:
        import open_clip  # noqa: F401
        import open_clip_train.train  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name in ("open_clip", "open_clip_train"):
            return "not installed (`pip install --no-deps open-clip-torch`; --no-deps keeps this torch)"
        return (
            f"`import open_clip` fails: {error}. open_clip imports torchvision at import time "
            "(open_clip/utils.py) and needs it for its transforms; PyPI torchvision does not load beside "
            f"torch {torch.__version__} (its wheels are built for another torch)."
        )
    except Exception as error:  # e.g. "operator torchvision::nms does not exist" from a mismatched torchvision
        return f"`import open_clip` fails: {type(error).__name__}: {error}"
    return ""


# ----------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 windows of 3 steps per loop.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=None, help="Timed windows per loop (default 8, quick 3).")
    parser.add_argument("--window-steps", type=int, default=None, help="Optimizer steps per window (default 4).")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="Also time bare-loop variants (foreach AdamW, eager attention, no clipping, NCHW input, "
        "text padded to 77) and the Trainer over clip_accel's cache.",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Also clip_accel with --torch_compile (and, with --ablations, a compiled bare loop). "
        "The compiler's worker processes disturb the other loops' windows while it compiles.",
    )
    args = parser.parse_args()
    windows = args.windows or (3 if args.quick else 8)
    window_steps = args.window_steps or (3 if args.quick else 4)
    warmup_steps = window_steps if not args.compile else 2 * window_steps
    total_steps = warmup_steps + windows * window_steps
    batch_size = args.batch_size
    hf_logging.set_verbosity_error()  # e.g. CLIPImageProcessor's "no torchvision: PIL backend", said in the notes

    print(f"Machine: {common.machine_description()}\n")
    data_dir = str(common.write_bench_dataset())
    model_config = common.write_model_config()
    work = tempfile.mkdtemp(prefix="clip_accel_train_bench-")

    contenders: list[Contender] = []
    run, gate, thread = start_clip_accel(data_dir, model_config, batch_size, total_steps, work)
    contenders.append(
        Contender(
            "clip_accel (prepare_run + fit)",
            gate,
            thread,
            "cache -> zero-copy batches, Accelerate, plain_step; fused AdamW, prefetching thread",
        )
    )
    module = run.accelerator.unwrap_model(run.model)  # the trainer's ContrastiveModel around the CLIPModel
    clip = module.clip
    initial_state = copy.deepcopy(ContrastiveModel.clip_state_dict(module.state_dict()))
    image_processor = run.processor.image_processor
    mean, std = image_processor.image_mean, image_processor.image_std
    image_size = clip.config.vision_config.image_size

    def fresh_model(attention: str = "sdpa") -> CLIPModel:
        model = CLIPModel(copy.deepcopy(clip.config))
        model.load_state_dict(initial_state)
        model.set_attn_implementation(attention)
        return model

    tensors = in_memory_tensors(run.train_data.pairs)
    bare_variants = {
        "bare PyTorch loop (same tensors)": BareOptions(),
        "bare PyTorch loop, identical second copy (A/A noise control)": BareOptions(),
    }
    if args.ablations:
        bare_variants.update(
            {
                "bare, foreach AdamW (not fused)": BareOptions(fused_adamw=False),
                "bare, eager attention (not SDPA)": BareOptions(attention="eager"),
                "bare, no gradient clipping": BareOptions(clip_grad=False),
                "bare, own-pair loss (no identical-caption positives)": BareOptions(caption_positives=False),
                "bare, pixels NCHW-contiguous (not channels-last)": BareOptions(nchw_contiguous=True),
                "bare, text padded to 77 (not to the batch's longest)": BareOptions(pad_to_77=True),
                "bare, out-of-place pixel normalisation (clip_accel before 96754c0)": BareOptions(
                    out_of_place_normalize=True
                ),
            }
        )
        if args.compile:
            bare_variants["bare + torch.compile (loss fn)"] = BareOptions(compile=True)
    if args.compile:
        _, gate, thread = start_clip_accel(
            data_dir, model_config, batch_size, total_steps, work, "clip_accel-compiled", torch_compile=True
        )
        contenders.append(
            Contender(
                "clip_accel fit() with --torch_compile",
                gate,
                thread,
                "compile time falls in the first windows; a new caption length may recompile",
            )
        )
    for name, options in bare_variants.items():
        gate = Gate(name)
        loop = bare_loop(fresh_model(options.attention), tensors, mean, std, batch_size, total_steps, gate, options)
        contenders.append(Contender(name, gate, gate.run(loop), "in-memory uint8 tensors, no DataLoader"))

    run_clip_train, _ = run_clip_datasets(data_dir, run.processor.tokenizer, image_size)
    _, gate, thread = start_trainer(fresh_model(), run_clip_train, batch_size, total_steps, work, "trainer")
    contenders.append(
        Contender(
            "transformers.Trainer, run_clip.py recipe (decode every step)",
            gate,
            thread,
            "PIL + CLIPImageProcessor (PIL backend; no torchvision here), text padded to 77; "
            "Trainer default optimizer (fused AdamW)",
        )
    )
    if args.ablations:
        _, gate, thread = start_trainer(
            fresh_model(), CachedForTrainer(tensors, mean, std), batch_size, total_steps, work, "trainer-cached"
        )
        contenders.append(
            Contender(
                "transformers.Trainer over clip_accel's cache (no decode)",
                gate,
                thread,
                "isolates the decode cost; text padded to the split's longest caption",
            )
        )
        _, gate, thread = start_clip_accel(
            data_dir, model_config, batch_size, total_steps, work, "clip_accel-steps", loop="steps"
        )
        contenders.append(
            Contender(
                "clip_accel loader + plain_step, without fit()", gate, thread, "no logging, no epoch-end checkpoint"
            )
        )
    reason = open_clip_status()
    contenders.append(
        Contender(
            "open_clip trainer",
            unavailable=reason or "imports, but running its trainer is not wired up in this script",
            note="",
        )
    )

    runnable = [c for c in contenders if not c.unavailable]
    for contender in runnable:  # warm-up window, not recorded
        contender.gate.window(warmup_steps)
    shuffler = random.Random(0)
    for _ in range(windows):
        # A fresh order every round: a loop that always ran right after the same neighbour (e.g. the decoding
        # Trainer, which leaves the caches and the allocator full of its own data) would pay for it every time.
        for contender in shuffler.sample(runnable, len(runnable)):
            contender.seconds.append(contender.gate.window(window_steps))
    for contender in runnable:
        contender.gate.release()
        contender.thread.join()

    pairs = window_steps * batch_size
    reference = common.median([pairs / s for s in runnable[0].seconds])
    rows = []
    for contender in contenders:
        if contender.unavailable:
            rows.append([contender.name, "n/a", "n/a", "n/a", "n/a", f"not run: {contender.unavailable}"])
            continue
        rates = [pairs / s for s in contender.seconds]
        rate = common.median(rates)
        overall = pairs * len(rates) / sum(contender.seconds)
        rows.append(
            [
                contender.name,
                round(rate, 1),
                f"{min(rates):.0f}-{max(rates):.0f}",
                round(overall, 1),
                f"{rate / reference:.2f}x",
                contender.note,
            ]
        )
    print(
        f"Batch {batch_size}, {windows} windows x {window_steps} optimizer steps per loop after a "
        f"{warmup_steps}-step warm-up; model: CLIP width 128, 4+4 layers, patch 32, 224 px "
        f"({sum(p.numel() for p in clip.parameters()) / 1e6:.1f}M parameters)\n"
    )
    print(
        common.markdown_table(
            [
                "loop",
                "pairs/s (median window)",
                "range over windows",
                "pairs/s (all windows)",
                "ratio to clip_accel (medians)",
                "notes",
            ],
            rows,
        )
    )
    rate_of = {c.name: common.median([pairs / s for s in c.seconds]) for c in runnable}
    bare = rate_of["bare PyTorch loop (same tensors)"]
    trainer = rate_of["transformers.Trainer, run_clip.py recipe (decode every step)"]
    steps_per_epoch = len(run.train_data)
    print(
        f"\nAn epoch-end checkpoint of the clip_accel run takes {checkpoint_seconds(run, work):.2f} s (median of 3, "
        f"timed apart after the windows); fit() writes one every {steps_per_epoch} steps (an epoch of this set), "
        "inside the windows, so windows holding one are the low end of its range."
    )
    print(
        f"\nclip_accel / bare loop = {reference / bare:.3f} (target >= 0.95: "
        f"{'met' if reference / bare >= 0.95 else 'MISSED'})"
    )
    print(
        f"clip_accel / Trainer + on-the-fly decoding = {reference / trainer:.2f} (target >= 1.5: "
        f"{'met' if reference / trainer >= 1.5 else 'MISSED'})"
    )
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
