#!/usr/bin/env bash
# The GPU check, as ONE prepared command for a lent GPU machine (issue 10):
# our AG-CycleGAN step beside the PyTorch peer, same sizes, same card, same call.
#
# Here, first:   bash ../shared/device/wheels.sh
#                mkdir -p .device && cp ../shared/peers/torch_agcg.py .device/
# Then, with the device tool: command "bash benchmarks/gpu_bench.sh", carry [".whl", ".device"].
# Results: $OUT/bench.jsonl (one JSON line per configuration) and a table on stdout; then, if the
# rows took under EVAL_AFTER_S seconds (default 330), `agcg evaluate` at scale
# (benchmarks/eval_bench.sh: paper networks, 256 px, 1,000 test phantoms; its last line
# eval_images_per_s=...) and the input pipeline on this host ($OUT/input.jsonl), then one row with
# the CPU conv rewrites on; each time-boxed so that the whole script stays under ~560 s (the
# device tool's limit per command is 600 s; what is under $OUT comes back even when cut).
# Copy the numbers, with the date, card and this command, into docs/benchmarks.md.
set -uo pipefail
OUT="${OUT:-/tmp/agcg-bench}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || { echo "no .whl: run ../shared/device/wheels.sh here first"; exit 1; }
STEPS="${STEPS:-30}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
for b in 1 8; do
  for dt in fp32 bf16; do  # one process each: a row lands in bench.jsonl as soon as it is measured
    timeout 120 python3 -m agcg_jax.cli bench --size 256 --batch "$b" --dtype "$dt" --steps "$STEPS" \
      --out "$OUT/bench.jsonl" || echo "agcg bench batch $b $dt failed or ran out of time"
  done
  timeout 45 python3 .device/torch_agcg.py --size 256 --batch "$b" --steps "$STEPS" >> "$OUT/bench.jsonl" || true
  timeout 45 python3 .device/torch_agcg.py --size 256 --batch "$b" --steps "$STEPS" --bf16 >> "$OUT/bench.jsonl" || true
done
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def key(r): return (r.get("batch_per_device", r.get("batch")), "bf16" in r["impl"])
torch = {key(r): r for r in rows if r["impl"].startswith("torch")}
print(f"{'impl':22} {'batch':>5} {'img/s':>8} {'ms/step':>8} {'compile s':>9} {'vs torch':>8}")
for r in rows:
  t = torch.get(key(r))
  ratio = f"{r['images_per_s'] / t['images_per_s']:.2f}x" if t and not r["impl"].startswith("torch") else ""
  impl = r["impl"] + ("+rewrites" if r.get("conv_rewrites") else "")
  print(f"{impl:22} {key(r)[0]:>5} {r['images_per_s']:8.1f} {r['ms_per_step']:8.1f} "
        f"{r.get('compile_s', ''):>9} {ratio:>8}")
PY
if (( SECONDS < ${EVAL_AFTER_S:-330} )); then
  EV=/tmp/agcg-eval-bench
  AGCG="python3 -m agcg_jax.cli" WORKDIR="$EV" timeout "${EVAL_LIMIT_S:-170}" bash benchmarks/eval_bench.sh \
    | tee "$OUT/eval.txt" || echo "eval_bench failed or ran out of time (see $EV.demo.log)"
  cp "$EV.demo.log" "$OUT/" 2>/dev/null || true
  for d in "$EV"/data/phantom_chest_xray/*/1.2.0; do
    timeout 50 python3 -m agcg_jax.cli bench --input "$d" --batch 8 --workers 0 4 --out "$OUT/input.jsonl" \
      | cut -c1-200 || echo "input bench failed"
  done
else
  echo "skipped the evaluation and input rows: ${SECONDS} s already (EVAL_AFTER_S=${EVAL_AFTER_S:-330})"
fi
if (( SECONDS < 460 )); then
  # The exact conv rewrites (models/conv_rewrites.py) are on by default only on the CPU; one row with
  # them on here says whether the GPU default should change.
  timeout 100 python3 -m agcg_jax.cli bench --size 256 --batch 8 --dtype bf16 --steps "$STEPS" --out "$OUT/bench.jsonl" \
    --config.model.conv_rewrites=on || echo "agcg bench with conv rewrites failed"
fi
