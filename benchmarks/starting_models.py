"""Parameter counts and refusals behind docs/starting-models.md's table of starting points, from open_clip's configs.

For each open_clip architecture of the table: `check_mappable` on open_clip's own `model_configs/NAME.json` (the
refusal's reason, or none), and for those that map, the CLIPModel that `clip_config` builds on torch's meta device
(no memory, no download), its parameters summed, and what they take in bf16 (2 bytes a parameter) and in float32
(4 bytes). Needs open_clip's files installed (`pip install --no-deps open_clip_torch`); nothing is imported from it.

    python benchmarks/starting_models.py
"""

from __future__ import annotations

import torch
from transformers import CLIPModel

from clip_accel.config import UserError
from clip_accel.open_clip_format import check_mappable, clip_config, open_clip_model_config

ARCHITECTURES = [
    "ViT-B-32",
    "ViT-B-32-quickgelu",
    "ViT-B-16",
    "ViT-B-16-quickgelu",
    "ViT-L-14",
    "ViT-L-14-quickgelu",
    "ViT-L-14-336",
    "ViT-H-14",
    "ViT-H-14-quickgelu",
    "ViT-H-14-378-quickgelu",
    "ViT-bigG-14",
    "convnext_base_w",
    "MobileCLIP-B",
    "EVA02-L-14",
    "ViT-B-16-SigLIP",
    "coca_ViT-L-14",
    "ViT-L-14-CLIPA",
    "xlm-roberta-base-ViT-B-32",
]


def main() -> None:
    print("| open_clip architecture | maps | parameters (M) | bf16 weights (GiB) | float32 weights (GiB) |")
    print("|---|---|---:|---:|---:|")
    for name in ARCHITECTURES:
        model_cfg = open_clip_model_config(name)
        try:
            check_mappable(model_cfg, name)
        except UserError as error:
            print(f"| {name} | refused: {str(error).split(': ', 1)[1].split('. Start')[0]} | | | |")
            continue
        with torch.device("meta"):
            model = CLIPModel(clip_config(model_cfg, name))
        count = sum(parameter.numel() for parameter in model.parameters())
        print(f"| {name} | yes | {count / 1e6:.2f} | {count * 2 / 2**30:.2f} | {count * 4 / 2**30:.2f} |")


if __name__ == "__main__":
    main()
