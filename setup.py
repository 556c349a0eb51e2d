"""The build hook behind pyproject.toml: the top-level model_card_template.md is shipped inside the package.

setuptools' `data-files` install beside the environment, not into a package, and `package-data` only takes files
under the package: this copies the one template at the repository root into the built package, so the wheel's
copy and the root file are the same bytes (tests/test_cli.py checks it).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"


class BuildPyWithCardTemplate(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, "clip_accel", TEMPLATE.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEMPLATE, target)


setup(cmdclass={"build_py": BuildPyWithCardTemplate})
