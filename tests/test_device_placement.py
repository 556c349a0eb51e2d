"""Nothing on the step or evaluation path makes a tensor on the CPU and hands it to a collective or a CUDA kernel.

On these CPU machines every tensor is on the CPU, so no run can show a misplaced one: this reads the source
instead. Every torch factory call in the modules the step and evaluation run through names its device, or is
listed below with where its tensor goes (a CUDA run would otherwise fail at its first collective, or silently
compute on the host).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clip_accel"
ON_THE_PATH = ("step", "loss", "evaluation", "metrics", "zero_shot", "model", "augment", "data/loader")
FACTORIES = {
    "arange", "as_tensor", "empty", "eye", "from_numpy", "full", "linspace", "ones", "rand", "randint", "randn",
    "randperm", "tensor", "zeros",
}  # fmt: skip
# (module, call) -> where the host tensor goes
ON_THE_HOST = {
    ("metrics", "torch.tensor([ids[caption] for caption in captions])"): "moved to the embeddings' device in _ranks",
    ("model", "torch.tensor(list(image_std))"): "a PixelNormalizer buffer, moved with .to(device) by its callers",
    ("model", "torch.tensor(list(image_mean))"): "a PixelNormalizer buffer, moved with .to(device) by its callers",
    ("model", "torch.from_numpy(spatial_shapes_on_host)"): "SigLIP 2's grids, read on the host (model.py explains)",
    ("augment", "torch.from_numpy(theta)"): "moved to the pixels' device before the crop",
    ("data/loader", "torch.from_numpy(pixels)"): "a batch on the host: Accelerate's loader copies it to the device",
    ("data/loader", "torch.from_numpy(input_ids)"): "a batch on the host: Accelerate's loader copies it",
    ("data/loader", "torch.from_numpy(grids)"): "a batch on the host: Accelerate's loader copies it",
    ("data/loader", "torch.from_numpy(caption_ids)"): "a batch on the host: Accelerate's loader copies it",
    ("data/loader", "torch.from_numpy(pad_captions(captions, *self.padding))"): "captions alone: copied likewise",
    ("evaluation", "torch.from_numpy(owners)"): "moved to the embeddings' device in evaluate_retrieval",
    ("evaluation", "torch.from_numpy(index)"): "moved to the embeddings' device in evaluate_retrieval",
}


def host_factory_calls() -> set[tuple[str, str]]:
    found = set()
    for module in ON_THE_PATH:
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            call = node if isinstance(node, ast.Call) else None
            if call is None or not isinstance(call.func, ast.Attribute) or call.func.attr not in FACTORIES:
                continue
            from_torch = isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
            if from_torch and "device" not in {keyword.arg for keyword in call.keywords}:
                found.add((module, ast.unparse(call)))
    return found


def test_every_tensor_made_on_the_step_and_evaluation_path_names_its_device():
    unlisted = host_factory_calls() - ON_THE_HOST.keys()
    assert not unlisted, f"made on the host without device=: {sorted(unlisted)}; pass device= or list it here"


def test_the_list_of_host_tensors_holds_no_stale_entry():
    assert not ON_THE_HOST.keys() - host_factory_calls()
