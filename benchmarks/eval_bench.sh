#!/usr/bin/env bash
# `agcg evaluate` at scale (issue 10): images/s of the whole command over prepared test phantoms,
# after 2-step training stages (the scores do not matter here, the time does).
#
#   bash benchmarks/eval_bench.sh                                  # paper networks, 256 px, 1,000 images
#   CONFIG=configs/demo.py NUM_TEST=256 bash benchmarks/eval_bench.sh   # demo networks (CPU)
#   WORKDIR=/tmp/ev AGCG="python3 -m agcg_jax.cli" bash benchmarks/eval_bench.sh   # (gpu_bench.sh)
#
# Prints the evaluation's own progress (s/batch) and, last, one line:
#   eval_images_per_s=X.X (N images, S px, T s for the command, compiled already)
# The first `agcg evaluate` (inside `agcg demo`) compiles into the workdir's compilation cache;
# the one timed here finds it there, so T is reading, the device's work and the host's share.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/phantoms.py}"
NUM_TEST="${NUM_TEST:-1000}"
AGCG="${AGCG:-.venv/bin/agcg}"
if [[ -z "${WORKDIR:-}" ]]; then
  # Our own scratch workdir: start it afresh, so a run of another config or size left there by an
  # earlier call is not refused ("holds a run of another config"). A WORKDIR you give is kept.
  WORKDIR=/tmp/agcg-eval-bench
  rm -rf "$WORKDIR"
fi
FLAGS=(--config "$CONFIG" --workdir "$WORKDIR" --config.data.num_train=64
       --config.data.num_test="$NUM_TEST" --config.classifier.steps=2 --config.ctr.steps=2
       --config.gan.steps=2 "$@")
$AGCG demo "${FLAGS[@]}" > "$WORKDIR.demo.log" 2>&1 \
  || { tail -3 "$WORKDIR.demo.log"; echo "eval_bench: the 2-step demo failed ($WORKDIR.demo.log)"; exit 1; }
t0=$(date +%s.%N)
$AGCG evaluate "${FLAGS[@]}" 2>&1 | tr '\r' '\n' | grep -E "^evaluate:|^agcg: error" | tail -2
t1=$(date +%s.%N)
python3 - "$WORKDIR/metrics.json" "$t0" "$t1" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
t = float(sys.argv[3]) - float(sys.argv[2])
print(f"eval_images_per_s={m['num_test'] / t:.1f} ({m['num_test']} images, {m['image_size']} px, "
      f"{t:.1f} s for the command, compiled already; {m['device']})")
PY
