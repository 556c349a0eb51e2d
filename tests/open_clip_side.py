"""open_clip for the tests that compare with it (test_open_clip_format, test_open_clip_export), imported beside
the CPU build of torch.

torchvision: open_clip imports it, and the registry's torchvision wheel is a CUDA build whose compiled operators do
not register beside torch's CPU build: `import torchvision` fails with "operator torchvision::nms does not exist" (its
meta kernels are registered for operators that are not there). Installed beside the project it also breaks
transformers, which then imports its torchvision image-processor backend and fails (`from transformers import
CLIPImageProcessor` raises), so open_clip_torch cannot be a plain test requirement. The tests read open_clip,
torchvision and their pure-Python dependencies from a side folder, `.open_clip_deps` (docs/code-layout.md,
"Tests and CI"), after transformers has settled on its PIL backend, and declares each missing operator's schema with
`torch.library` before the import (retrying on the next name the error gives): torchvision's Python parts then
import, and open_clip needs only those (its transforms, which run on PIL images). Where the folder is missing (a
fresh clone, CI), the first test that needs open_clip installs it there from the package registry (seconds).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers.utils.import_utils import is_torchvision_available

SIDE_FOLDER = Path(__file__).resolve().parent.parent / ".open_clip_deps"
REQUIREMENTS = ["open_clip_torch==3.3.0", "timm==1.0.29", "ftfy==6.3.1", "wcwidth==0.9.5", "torchvision==0.28.0"]
INSTALL = f"pip install --no-deps --target .open_clip_deps {' '.join(REQUIREMENTS)}"
TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_declared = []  # the torch.library.Library must outlive the import


def import_open_clip():
    """open_clip from the side folder, importable beside the CPU torch (see the module's docstring), or a skip."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    if not (SIDE_FOLDER / "open_clip").is_dir():  # (CI's fresh clone: installed here, from the package registry)
        installed = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(SIDE_FOLDER), *REQUIREMENTS],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert installed.returncode == 0, f"{INSTALL} failed:\n{installed.stderr[-3000:]}"
    is_torchvision_available()  # decided (and cached) before torchvision becomes findable: PIL image processors
    sys.path.insert(0, str(SIDE_FOLDER))
    try:
        library = torch.library.Library("torchvision", "FRAGMENT")
        _declared.append(library)
        for _ in range(20):
            try:
                import torchvision  # noqa: F401

                break
            except RuntimeError as error:
                missing = re.search(r"operator torchvision::(\w+) does not exist", str(error))
                if missing is None:
                    raise
                library.define(TORCHVISION_SCHEMAS.get(missing[1], f"{missing[1]}(Tensor x) -> Tensor"))
                for name in [name for name in sys.modules if name.startswith("torchvision")]:
                    del sys.modules[name]
        import open_clip
    finally:
        sys.path.remove(str(SIDE_FOLDER))
    return open_clip
