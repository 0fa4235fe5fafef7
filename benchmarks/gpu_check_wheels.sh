#!/usr/bin/env bash
# Wheels of what benchmarks/gpu_check.sh needs beyond the lent NVIDIA machines' image
# (Python 3.12, x86-64; it has jax, flax, optax, diffrax, orbax, absl, etils, PyYAML,
# cloudpickle, protobuf and psutil), into .whl/ of the repository, which .gitignore
# lists: carry it with the run. Needs PyPI; about 4.5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl \
  ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
ls -l .whl
