"""The optimizer step's path: no value read back from the device, and a non-finite step skipped on the device."""

from __future__ import annotations

import distributed_worker
import pytest
import torch
from accelerate import Accelerator

from clip_accel.config import TrainConfig
from clip_accel.optim import build_optimizer
from clip_accel.step import exact_step, plain_step


def _context_with_the_trainers_optimizer():
    accelerator = Accelerator(cpu=True)
    context = distributed_worker.step_context(accelerator)
    model = accelerator.unwrap_model(context.model)
    context.optimizer = accelerator.prepare(build_optimizer(model, TrainConfig(learning_rate=1e-3)))
    context.scheduler = distributed_worker.StepCounter()
    return context


def _micro_batches(count: int, repeats: str | None = None) -> list[dict[str, torch.Tensor]]:
    pairs = distributed_worker.synthetic_pairs(16, seed=1, repeats=repeats)
    size = 16 // count
    return [distributed_worker.stack(pairs[i : i + size]) for i in range(0, 16, size)]


def _forbid_reading_back(monkeypatch) -> None:
    """On a GPU each of these waits for the device to finish its queue."""

    def read_back(*_args, **_kwargs):
        raise AssertionError("the step read a value back from the device")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, read_back)


@pytest.mark.parametrize("positives", ["own", "identical"])
@pytest.mark.parametrize("take_step, micro_batches", [(plain_step, 1), (plain_step, 4), (exact_step, 4)])
def test_an_optimizer_step_reads_nothing_back_from_the_device(monkeypatch, take_step, micro_batches, positives):
    context = _context_with_the_trainers_optimizer()
    context.caption_positives = positives  # identical: the positive mask of repeated captions, built on the device
    batches = _micro_batches(micro_batches, repeats="same" if positives == "identical" else None)
    before = [p.detach().clone() for p in context.model.parameters()]
    _forbid_reading_back(monkeypatch)
    loss, skipped = take_step(context, batches)
    monkeypatch.undo()
    assert torch.isfinite(loss) and not skipped
    assert all(not torch.equal(p, b) for p, b in zip(context.model.parameters(), before, strict=True))


def test_a_step_with_non_finite_gradients_changes_nothing_and_says_so(monkeypatch):
    context = _context_with_the_trainers_optimizer()
    plain_step(context, _micro_batches(1))  # the optimizer has state (moments, step count) to keep intact
    with torch.no_grad():
        context.model.clip.visual_projection.weight[0, 0] = float("nan")  # NaN loss, NaN gradients
    before = [p.detach().clone() for p in context.model.parameters()]
    moments = [s["exp_avg"].clone() for s in context.optimizer.optimizer.state.values()]
    _forbid_reading_back(monkeypatch)
    loss, skipped = plain_step(context, _micro_batches(1))
    monkeypatch.undo()
    assert not torch.isfinite(loss) and bool(skipped)
    for parameter, old in zip(context.model.parameters(), before, strict=True):
        torch.testing.assert_close(parameter, old, equal_nan=True, rtol=0, atol=0)
    for state, old in zip(context.optimizer.optimizer.state.values(), moments, strict=True):
        assert torch.equal(state["exp_avg"], old) and state["step"].item() == 1


@pytest.mark.parametrize("enabled, precision", [(True, "high"), (False, "highest")])
def test_tf32_is_switched_on_cuda_and_cpus_are_left_alone(enabled, precision):
    from clip_accel.step import use_tf32

    default, convolutions = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        use_tf32(torch.device("cpu"), enabled)
        assert torch.get_float32_matmul_precision() == default and torch.backends.cudnn.allow_tf32 == convolutions
        use_tf32(torch.device("cuda"), enabled)  # only sets flags: no GPU needed
        assert torch.get_float32_matmul_precision() == precision and torch.backends.cudnn.allow_tf32 == enabled
    finally:
        torch.set_float32_matmul_precision(default)
        torch.backends.cudnn.allow_tf32 = convolutions


@pytest.mark.parametrize("take_step, micro_batches", [(plain_step, 1), (exact_step, 4)])
def test_gradient_checkpointing_leaves_the_gradient_unchanged(take_step, micro_batches):
    from clip_accel.model import enable_gradient_checkpointing

    def gradients(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        context = distributed_worker.step_context(Accelerator(cpu=True))
        context.max_grad_norm = 0.0  # no clipping: the raw gradient
        model = context.model.clip
        if checkpointing:
            enable_gradient_checkpointing(model)
        recomputed = []  # each layer's first op run with grad enabled: again in the backward with checkpointing
        hooks = [
            layer.layer_norm1.register_forward_pre_hook(lambda *_: recomputed.append(torch.is_grad_enabled()))
            for layer in [*model.vision_model.encoder.layers, *model.text_model.encoder.layers]
        ]
        captured = []
        context.optimizer.optimizer.register_step_pre_hook(
            lambda optimizer, *_: captured.extend(p.grad.clone() for g in optimizer.param_groups for p in g["params"])
        )
        take_step(context, _micro_batches(micro_batches))
        for hook in hooks:
            hook.remove()
        return captured, sum(recomputed)

    plain, plain_forwards = gradients(False)
    checkpointed, checkpointed_forwards = gradients(True)
    assert checkpointed_forwards > plain_forwards  # the layers really ran again in the backward
    for reference, gradient in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(gradient, reference, rtol=1e-5, atol=1e-7)


@pytest.fixture
def fp16_context(monkeypatch):
    """The trainer's fused AdamW under Accelerate's fp16 path (autocast + grad scaler, kept on CPU by fp16_cpu)."""
    from accelerate.state import AcceleratorState
    from fp16_cpu import keep_fp16_on_cpu

    keep_fp16_on_cpu(monkeypatch)
    AcceleratorState._reset_state(reset_partial_state=True)  # precision is fixed once per process otherwise
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.scaler is not None and accelerator.native_amp
    context = distributed_worker.step_context(accelerator)
    context.optimizer = accelerator.prepare(build_optimizer(accelerator.unwrap_model(context.model), TrainConfig()))
    context.scheduler = distributed_worker.StepCounter()
    yield context
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("take_step, micro_batches", [(plain_step, 1), (exact_step, 4)])
def test_fp16_a_finite_step_applies_an_overflowing_one_is_skipped_and_the_scale_halves(
    fp16_context, take_step, micro_batches
):
    context, scaler = fp16_context, fp16_context.accelerator.scaler
    inner = context.optimizer.optimizer
    model = context.accelerator.unwrap_model(context.model)
    batches = _micro_batches(micro_batches)
    dtypes = set()  # the step's forward really computes in float16
    model.clip.visual_projection.register_forward_hook(lambda _module, _inputs, output: dtypes.add(output.dtype))
    observed = []
    for overflow in (False, True, False, True, True, False):
        hook = None
        if overflow:  # an inf gradient only: the forward stays finite, the scaler finds it when unscaling
            hook = model.clip.text_projection.weight.register_hook(lambda grad: grad * float("inf"))
        before = [p.detach().clone() for p in model.parameters()]
        scale, steps = scaler.get_scale(), context.scheduler.steps
        _, skipped = take_step(context, batches)
        if hook is not None:
            hook.remove()
        unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        observed.append((bool(skipped), unchanged, scaler.get_scale() / scale, context.scheduler.steps - steps))
        assert not hasattr(inner, "found_inf") and not hasattr(inner, "grad_scale"), "nothing leaks to the next step"
    assert observed == [
        (overflow, overflow, 0.5 if overflow else 1.0, 0 if overflow else 1)
        for overflow in (False, True, False, True, True, False)
    ]
    assert dtypes == {torch.float16}
    assert inner.state[next(iter(inner.state))]["step"].item() == 3  # AdamW counted the applied steps only


def test_fp16_without_a_grad_scaler_is_refused_instead_of_training_in_float32(make_configs):
    from accelerate.state import AcceleratorState

    from clip_accel.trainer import train

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.raises(ValueError, match="fp16 runs with a grad scaler, which Accelerate sets up on GPUs only"):
            train(*make_configs(mixed_precision="fp16"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("take_step, micro_batches", [(plain_step, 1), (exact_step, 2)])
@pytest.mark.native_kernels
def test_under_torch_compile_the_steps_compile_once_without_graph_breaks_or_recompiles(take_step, micro_batches):
    # Dynamo's tracing (graph breaks, guards, recompiles) is the same whatever the backend; "eager" skips inductor's
    # lowering of each graph (the trainer's --torch_compile uses inductor). Captions are padded to each batch's
    # longest, so the text length changes every step: after the second length Dynamo marks it dynamic.
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    accelerator = Accelerator(cpu=True, dynamo_backend="eager")
    context = distributed_worker.step_context(accelerator)
    assert isinstance(context.model, torch._dynamo.eval_frame.OptimizedModule)

    def steps(*lengths: int) -> None:
        for index, length in enumerate(lengths):
            pairs = distributed_worker.synthetic_pairs(16, seed=index, text_length=length)
            size = 16 // micro_batches
            take_step(context, [distributed_worker.stack(pairs[i : i + size]) for i in range(0, 16, size)])

    steps(7, 9)  # warm-up: a static graph, then one with a dynamic length (exact: each with and without grad)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2 * micro_batches < torch._dynamo.config.recompile_limit
    steps(11, 5, 13, 6)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the first steps"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch._dynamo.reset()
