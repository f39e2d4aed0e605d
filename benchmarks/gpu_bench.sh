#!/usr/bin/env bash
# The GPU check, as ONE prepared command for a lent GPU machine (issue 2/4):
# our AG-CycleGAN step beside the PyTorch peer, same sizes, same card, same call.
#
# Here, first:   bash ../shared/device/wheels.sh
#                mkdir -p .device && cp ../shared/peers/torch_agcg.py .device/
# Then, with the device tool: command "bash benchmarks/gpu_bench.sh", carry [".whl", ".device"].
# Results: $OUT/bench.jsonl (one JSON line per configuration) and a table on stdout.
# Copy the numbers, with the date, card and this command, into docs/benchmarks.md.
set -uo pipefail
OUT="${OUT:-/tmp/agcg-bench}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || { echo "no .whl: run ../shared/device/wheels.sh here first"; exit 1; }
STEPS="${STEPS:-30}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
for b in 1 8; do
  python3 -m agcg_jax.cli bench --size 256 --batch "$b" --dtype fp32 bf16 --steps "$STEPS" \
    --out "$OUT/bench.jsonl" || echo "agcg bench batch $b failed"
  python3 .device/torch_agcg.py --size 256 --batch "$b" --steps "$STEPS" >> "$OUT/bench.jsonl" || true
  python3 .device/torch_agcg.py --size 256 --batch "$b" --steps "$STEPS" --bf16 >> "$OUT/bench.jsonl" || true
done
# The exact conv rewrites (models/conv_rewrites.py) are on by default only on the CPU; one row with
# them on here says whether the GPU default should change.
python3 -m agcg_jax.cli bench --size 256 --batch 8 --dtype bf16 --steps "$STEPS" --out "$OUT/bench.jsonl" \
  --config.model.conv_rewrites=on || echo "agcg bench with conv rewrites failed"
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
