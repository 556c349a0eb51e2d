"""Training augmentation that keeps the cache's speed: the training split is cached a little larger than the
model's resolution (shortest side 256 for 224, centre-cropped square), and each sample gets, on the device, a
random resized crop (torchvision's RandomResizedCrop: area fraction drawn from `scale`, aspect ratio from 3/4 to
4/3, log-uniform) resized bicubically to the model's resolution, and optionally a horizontal flip.

The crops of an optimizer step are a pure function of (seed, step, process): a resumed run draws exactly the crops
the uninterrupted one drew, and both passes of exact accumulation see the same pixels (the crops are drawn once
per step, before it). Evaluation splits are never augmented: they keep `CLIPProcessor`'s exact centre crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CACHE_RATIO = 256 / 224  # CLIP's resize-then-crop ratio: the cached side for a 224-pixel model is 256


def training_cache_size(image_size: int) -> int:
    """The side of the cached training images when augmenting (256 for 224)."""
    return round(image_size * CACHE_RATIO)


@dataclass(frozen=True)
class Augmenter:
    image_size: int
    scale: tuple[float, float] = (0.9, 1.0)
    flip: bool = False
    seed: int = 0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], step: int, process: int) -> list[dict]:
        """The step's micro-batches with `pixel_values` (B, S', S', 3) uint8 replaced by augmented (B, S, S, 3)
        uint8 pixels (what the cache holds without augmentation: no more device memory per step), drawn for
        optimizer step `step` on `process`."""
        sizes = [batch["pixel_values"].shape[0] for batch in micro_batches]
        thetas = self.crop_transforms(sum(sizes), step, process)
        out, start = [], 0
        for batch, size in zip(micro_batches, sizes, strict=True):
            pixels = batch["pixel_values"]
            theta = thetas[start : start + size].to(pixels.device, non_blocking=True)
            out.append({**batch, "pixel_values": self.crop(pixels, theta)})
            start += size
        return out

    def crop_transforms(self, count: int, step: int, process: int) -> torch.Tensor:
        """(count, 2, 3) affine maps from output to input coordinates (`affine_grid`'s convention, corners at
        +-1): each one a random resized crop, mirrored when flipped. Drawn on the host from a generator seeded
        by (seed, step, process): nothing random is taken from the global RNGs, so nothing else shifts."""
        rng = np.random.default_rng([self.seed, step, process])
        area = rng.uniform(self.scale[0], self.scale[1], count)
        log_ratio = rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), count)
        # Crop width and height as fractions of the cached side; torchvision redraws a crop that does not fit,
        # here it is clamped to the image (the same crops when it fits, as with the default mild scales).
        width = np.minimum(np.sqrt(area * np.exp(log_ratio)), 1.0)
        height = np.minimum(np.sqrt(area / np.exp(log_ratio)), 1.0)
        # Crop centres, uniform over the positions where the crop fits, in [-1, 1] coordinates.
        centre_x = (rng.uniform(0, 1, count) * (1 - width) + width / 2) * 2 - 1
        centre_y = (rng.uniform(0, 1, count) * (1 - height) + height / 2) * 2 - 1
        mirror = np.where(rng.uniform(0, 1, count) < 0.5, -1.0, 1.0) if self.flip else np.ones(count)
        theta = np.zeros((count, 2, 3), np.float32)
        theta[:, 0, 0], theta[:, 0, 2] = width * mirror, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
        return torch.from_numpy(theta)

    def crop(self, pixels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S', S', 3) -> uint8 (B, S, S, 3): each image cropped by its `theta` and resized bicubically,
        rounded and clamped to [0, 255] as resizing an image does (torchvision's RandomResizedCrop on uint8)."""
        images = pixels.permute(0, 3, 1, 2).float()
        grid = F.affine_grid(theta, [len(images), 3, self.image_size, self.image_size], align_corners=False)
        images = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
        return images.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
