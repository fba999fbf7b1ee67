#!/usr/bin/env bash
# Runs the default test suite (about 15 minutes on 2 cores). Slow end-to-end runs: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
if [ $# -eq 0 ]; then set -- -m "not slow and not gpu"; fi
exec .venv/bin/python -m pytest "$@"
