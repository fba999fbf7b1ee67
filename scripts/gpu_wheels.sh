#!/usr/bin/env bash
# Collects, into .gpu-wheels/ (ignored by git), the wheels the torch-only GPU check needs beyond PyTorch and
# transformers: DeepSpeed 0.19.8 (an sdist, built here into a pure-Python wheel: its CUDA ops compile only
# when used, and the check uses none) and what DeepSpeed and the trainer's config import. About 6 MB for
# CPython 3.11 on x86_64. For a machine with another Python, pass pip download's target options:
#   bash scripts/gpu_wheels.sh --python-version 3.12 --platform manylinux2014_x86_64
# On that machine: pip install --no-index --no-deps .gpu-wheels/*.whl && python scripts/gpu_check_torch.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip wheel --no-deps -q -w .gpu-wheels deepspeed==0.19.8
"$PY" -m pip download --no-deps --only-binary=:all: -q -d .gpu-wheels "$@" hjson py-cpuinfo ninja msgpack einops \
    psutil "pydantic>=2.6,<3" pydantic-core annotated-types typing-inspection
du -sh .gpu-wheels
