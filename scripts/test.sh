#!/usr/bin/env bash
# Runs the default test suite (slow and GPU tests excluded). Extra arguments go to pytest:
#   bash scripts/test.sh tests/sandbox -x      a part of the suite
#   bash scripts/test.sh -m slow               the slow end-to-end runs (a given -m replaces the default)
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
marker=(-m "not slow and not gpu")
for arg in "$@"; do
    case "$arg" in -m|-m*) marker=() ;; esac
done
exec .venv/bin/python -m pytest "${marker[@]}" "$@"
