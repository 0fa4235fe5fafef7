#!/usr/bin/env bash
# The accelerator check (benchmarks/gpu_check.py), for a machine with no internet.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py flags]     e.g. --smoke, --out FILE
#
# Runs $PYTHON (default python3) with the JAX it has: on the lent NVIDIA machines the
# image's python3 has JAX with CUDA, flax, optax, diffrax and orbax. The few imports of
# fmjax's experiments that such an image lacks travel as wheels in .whl/ (made beforehand,
# where PyPI is reachable, by `bash benchmarks/gpu_check_wheels.sh`); they are installed
# from there with no index, into /tmp/fmjax_site. If an import is still missing it says
# which and stops with status 3. The JSON goes to $OUT/gpu_check.json where OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fmjax_site .whl/*.whl
  export PYTHONPATH=/tmp/fmjax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import experiments.images, experiments.configs.imagenet32, fmjax.metrics.bpd" \
    2> /tmp/gpu_check_import.log; then
  tail -n 3 /tmp/gpu_check_import.log >&2
  echo "gpu_check: an import is missing (above). Make the wheels where PyPI is reachable:" \
    "bash benchmarks/gpu_check_wheels.sh, and carry .whl with the run." >&2
  exit 3
fi
"$PY" -c "import jax; print('gpu_check: jax', jax.__version__, jax.devices())"
exec "$PY" benchmarks/gpu_check.py "$@"
