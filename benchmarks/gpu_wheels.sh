#!/usr/bin/env bash
# Fetch (here, where pip reaches the package index) the wheels benchmarks/gpu_check.sh installs on the GPU host,
# whose image lacks them: datasets, the two of its needs it lacks and the pyarrow it needs (the image's may be
# older; 55 MB of the 64 MB a call carries), and open_clip with its own. Python 3.12,
# x86-64 manylinux, no dependencies resolved (the host has the rest). Then: `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 open-clip-torch ftfy wcwidth
du -sh .whl && ls .whl
