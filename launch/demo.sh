#!/usr/bin/env bash
# The main job on built-in phantom data, on the CPU: sets up, then
#   agcg demo --config configs/demo.py --workdir runs/demo
# Ends with runs/demo/report.html and runs/demo/metrics.json. Re-running
# resumes (or, when finished, re-evaluates) instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
exec agcg demo --config configs/demo.py --workdir "${AGCG_WORKDIR:-runs/demo}" "$@"
