#!/usr/bin/env bash
# Sets up, then runs the test suite (pass pytest arguments through, e.g. -k cam).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
exec python -m pytest -q -n 2 --durations=15 "$@"
