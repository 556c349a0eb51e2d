"""--augment: random resized crops of a larger cached image, drawn per step on the device, seeded for resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clip_accel.augment import Augmenter, training_cache_size


def _ramp(count: int = 64, side: int = 37) -> torch.Tensor:
    """uint8 (count, side, side, 3) images whose red channel rises left to right and green top to bottom."""
    ramp = torch.linspace(0, 255, side)
    image = torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side), torch.zeros(side, side)], -1)
    return image.round().to(torch.uint8).expand(count, side, side, 3).contiguous()


def test_the_cache_is_kept_at_clips_resize_ratio():
    assert training_cache_size(224) == 256 and training_cache_size(32) == 37


def test_a_full_crop_is_the_bicubic_resize_of_the_cached_image():
    augmenter = Augmenter(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    pixels = _ramp(4)
    [batch] = augmenter([{"pixel_values": pixels}], step=0, process=0)
    resized = F.interpolate(pixels.permute(0, 3, 1, 2).float(), size=32, mode="bicubic", align_corners=False)
    assert batch["pixel_values"].shape == (4, 32, 32, 3) and batch["pixel_values"].dtype == torch.uint8
    expected = resized.clamp(0, 255).permute(0, 2, 3, 1)
    torch.testing.assert_close(batch["pixel_values"].float(), expected, atol=0.5 + 1e-3, rtol=0)  # rounded


def test_crops_cover_the_drawn_fraction_of_the_image_at_random_places():
    # A quarter of the area, square: each crop spans half the ramp's range, starting anywhere it fits.
    augmenter = Augmenter(32, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    red = augmenter([{"pixel_values": _ramp()}], step=3, process=0)[0]["pixel_values"][..., 0].float()
    spans = red[:, 0, -1] - red[:, 0, 0]
    assert spans.min() > 0.45 * 255 and spans.max() < 0.52 * 255
    starts = red[:, 0, 0]
    assert starts.min() < 0.15 * 255 and starts.max() > 0.35 * 255  # positions spread over the free half


def test_flip_mirrors_about_half_the_images():
    pixels = _ramp()
    full = Augmenter(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = full([{"pixel_values": pixels}], 0, 0)[0]["pixel_values"].float()
    flipping = Augmenter(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    flipped = flipping([{"pixel_values": pixels}], 0, 0)[0]["pixel_values"].float()
    # atol 1: a mirrored sample may round the other way
    mirrored = torch.tensor([torch.allclose(f, p.flip(1), atol=1) for f, p in zip(flipped, plain, strict=True)])
    same = torch.tensor([torch.allclose(f, p, atol=1) for f, p in zip(flipped, plain, strict=True)])
    assert bool((mirrored ^ same).all()) and 16 < int(mirrored.sum()) < 48


def test_crops_are_a_function_of_seed_step_and_process_only():
    augmenter = Augmenter(32, scale=(0.5, 1.0), flip=True, seed=7)
    torch.manual_seed(0)
    first = augmenter.crop_transforms(8, step=5, process=1)
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(augmenter.crop_transforms(8, step=5, process=1), first)
    for other in (
        augmenter.crop_transforms(8, step=6, process=1),
        augmenter.crop_transforms(8, step=5, process=0),
        Augmenter(32, scale=(0.5, 1.0), flip=True, seed=8).crop_transforms(8, step=5, process=1),
    ):
        assert not torch.equal(other, first)


def test_micro_batches_of_a_step_get_distinct_crops_from_one_draw():
    augmenter = Augmenter(32, scale=(0.5, 1.0))
    pixels = _ramp(8)
    together = augmenter([{"pixel_values": pixels}], 2, 0)[0]["pixel_values"]
    halves = augmenter([{"pixel_values": pixels[:4]}, {"pixel_values": pixels[4:]}], 2, 0)
    torch.testing.assert_close(torch.cat([half["pixel_values"] for half in halves]), together)
    assert not torch.equal(halves[0]["pixel_values"], halves[1]["pixel_values"])


def test_bad_augmentation_options_fail_at_start_up(make_configs):
    with pytest.raises(ValueError, match="augment_scale takes MIN MAX"):
        make_configs(augment=True, augment_scale=[0.9, 1.2])
    with pytest.raises(ValueError, match="add --augment"):
        make_configs(augment_flip=True)


def test_training_sees_fresh_crops_of_a_larger_cache_and_evaluation_the_exact_centre_crop(make_configs, monkeypatch):
    from clip_accel import trainer

    seen = []  # (what the loader gave, what the step got), per step
    real_step = trainer.exact_step

    def recording_step(context, micro_batches):
        seen.append((loaded.pop(), [batch["pixel_values"].clone() for batch in micro_batches]))
        return real_step(context, micro_batches)

    loaded = []
    monkeypatch.setattr(trainer, "exact_step", recording_step)
    configs = make_configs(augment=True, max_steps=2, eval_initial_model=False, gradient_accumulation_steps=2)
    run = trainer.prepare_run(*configs)
    real_augmenter = run.augmenter

    def recording_augmenter(micro_batches, step, process):
        loaded.append([batch["pixel_values"].clone() for batch in micro_batches])
        return real_augmenter(micro_batches, step, process)

    run.augmenter = recording_augmenter
    try:
        for loader in (run.validation_loader, run.test_loader):  # evaluation: the exact centre crop, at 32 px
            assert loader.dataset.pixel_chunks[0].shape[1:] == (32, 32, 3)
        assert run.train_data.pairs.pixel_chunks[0].shape[1:] == (37, 37, 3)
        trainer.fit(run, trainer.TrainerState())
    finally:
        trainer._shut_down(run)
    assert len(seen) == 2
    resize = Augmenter(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for step, (cached, stepped) in enumerate(seen):
        assert [pixels.shape for pixels in cached] == [(32, 37, 37, 3)] * 2
        assert [pixels.shape for pixels in stepped] == [(32, 32, 32, 3)] * 2 and stepped[0].dtype == torch.uint8
        expected = real_augmenter([{"pixel_values": pixels} for pixels in cached], step, 0)
        assert all(torch.equal(e["pixel_values"], s) for e, s in zip(expected, stepped, strict=True))
        whole = resize([{"pixel_values": pixels} for pixels in cached], step, 0)
        assert not any(torch.equal(w["pixel_values"], s) for w, s in zip(whole, stepped, strict=True))  # cropped


def test_a_resumed_augmented_run_is_bit_identical(make_configs):
    from accelerate.state import AcceleratorState

    from clip_accel.trainer import train

    # A checkpoint at step 2; the run stops at 4. Resuming redoes steps 3-4 and must draw the same crops.
    # Exact accumulation over 2 micro-batches: both passes of a step must see the same crops.
    options = {"augment": True, "augment_scale": [0.5, 1.0], "augment_flip": True, "max_steps": 4}
    options.update(gradient_accumulation_steps=2)
    options.update(checkpointing_steps=2, eval_steps=4, eval_initial_model=False, early_stopping_patience=0)
    weights = []
    try:
        for resume in (None, "latest"):
            configs = make_configs(**options, resume_from_checkpoint=resume)
            train(*configs)
            weights.append(load_file(f"{configs[2].output_dir}/model.safetensors"))
            AcceleratorState._reset_state(reset_partial_state=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
