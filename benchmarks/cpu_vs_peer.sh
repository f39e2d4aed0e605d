#!/usr/bin/env bash
# agcg's training step against the PyTorch peer, on the same CPU cores, in one run.
#
#   bash benchmarks/cpu_vs_peer.sh                    # demo networks, 64x64, batch 4, fp32
#   SIZE=256 BATCH=1 bash benchmarks/cpu_vs_peer.sh   # other sizes
#   bash benchmarks/cpu_vs_peer.sh --config.model.gen_res=9   # overrides pass through
#   THREADS=2 ROUNDS=3 STEPS=30 CONFIG=configs/demo.py bash benchmarks/cpu_vs_peer.sh
#
# What it does:
#   1. Makes sure the benchmark-only venv with PyTorch exists
#      (benchmarks/peer_venv.sh: <repo>/.bench-venv, never a dependency of the
#      package). First run: installs PyPI's torch with its CUDA packages
#      (~5.4 GB; 1 min here on a fast mirror, more on a slow link); later
#      runs reuse it (seconds).
#   2. Reads the networks from the config (CONFIG, default configs/demo.py,
#      plus any --config.* overrides given as arguments) and passes the
#      matching widths to ../shared/peers/torch_agcg.py (--gen-width,
#      --gen-res, --att-width, --dis-width). Refuses configs the peer cannot
#      mirror (gen_down != 2, att_dilations != (1, 2, 4, 1), dis_layers != 3).
#      Both use 1-channel images. One known difference is kept: our generator
#      upsamples by sub-pixel conv (model.gen_upsample, DEVELOPERS.md), the
#      peer by ConvTranspose2d; pass --config.model.gen_upsample=transpose for
#      the literal layer. The demo's attention L1/TV priors (two cheap
#      reductions) stay on in ours.
#   3. Runs `agcg bench` and the peer alternately, ROUNDS times (default 2:
#      agcg, peer, agcg, peer at each thread setting), same size, per-device
#      batch, steps and warmup, fp32, on the CPU (JAX_PLATFORMS=cpu;
#      CUDA_VISIBLE_DEVICES= for the peer). Both count images of both
#      domains (2 x batch per step); agcg's compile time is reported apart
#      and not in its images/s.
#      Threads: each round runs both sides at every setting in THREADS
#      (default "1 <nproc> <nproc>x1"): 1 = one core (both pinned to core 0
#      by taskset; XLA: --xla_cpu_multi_thread_eigen=false
#      intra_op_parallelism_threads=1; torch: --threads 1), N = XLA's
#      default pool over all cores and torch --threads N, Nx1 = agcg as N data-parallel processes of one compute
#      thread each, pinned to one core each (JAX's multi-process runtime over
#      gloo, as launch/ runs several hosts; BATCH / N images per process, the
#      same global batch), the peer at --threads N on the same cores. Why
#      Nx1: it times the multi-process path that multi-host runs take (one
#      all-reduce per step, sharding.mean_over_shards; one per parameter made
#      it 1,367 ms per step here before, against 145 ms now). On one host it
#      gives about what XLA's thread pool gives (measured 2026-11-28, pinned:
#      one core, batch 2: 133 ms per step; two cores, batch 4: 134 ms), and
#      2 fake devices in one process do not help (the CPU client runs them in
#      turn: 170 ms). Why 1 as well: on a loaded machine
#      torch's OpenMP threads spin against other processes (measured here
#      under load ~8: peer 4,400 ms/step at 2 threads, 360 ms at 1), so one
#      setting alone can favour either side by 10x.
#   4. Prints every JSON row, then a summary, and as its LAST line
#      `ratio_vs_peer=X.XX` = best agcg images/s / best peer images/s, each
#      the best over rounds and thread settings. Best, not mean: on a shared
#      machine, interference only ever slows a run down, so the fastest run
#      of each is the closest to the code's own speed; the means per setting
#      are printed beside it.
#
# Time after the first run: about 5 min at the defaults on an idle 2-core
# machine (six agcg compiles of ~15-30 s), up to ~10 min on a loaded one.
# Results depend on what else runs on the cores: say so when quoting them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
AGCG_PY="${AGCG_PY:-$ROOT/.venv/bin/python}"
PEER="${PEER:-$ROOT/../shared/peers/torch_agcg.py}"
CONFIG="${CONFIG:-configs/demo.py}"
SIZE="${SIZE:-64}"
BATCH="${BATCH:-4}"
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-3}"
ROUNDS="${ROUNDS:-2}"
NPROC="$(nproc)"
DEFAULT_THREADS="1 $NPROC"
if [ "$NPROC" -gt 1 ] && [ $((BATCH % NPROC)) -eq 0 ]; then
  DEFAULT_THREADS="$DEFAULT_THREADS ${NPROC}x1"
fi
THREADS="${THREADS:-$DEFAULT_THREADS}"

[ -f "$PEER" ] || { echo "cpu_vs_peer: no peer at $PEER (set PEER=...)" >&2; exit 2; }
TORCH_PY="$(bash "$ROOT/benchmarks/peer_venv.sh")"

# The peer's flags, from the same config and overrides agcg bench will use.
PEER_FLAGS="$("$AGCG_PY" - "$CONFIG" "$@" <<'EOF'
import sys
from agcg_jax import config as config_lib
cfg = config_lib.apply_overrides(config_lib.load_config(sys.argv[1]), sys.argv[2:])
m = cfg.model
fixed = {"gen_down": (m.gen_down, 2), "att_dilations": (tuple(m.att_dilations), (1, 2, 4, 1)),
         "dis_layers": (m.dis_layers, 3)}
bad = [f"model.{k}={v!r} (peer: {want!r})" for k, (v, want) in fixed.items() if v != want]
if bad:
  sys.exit("cpu_vs_peer: the peer has no flag for " + ", ".join(bad))
print(f"--gen-width {m.gen_width} --gen-res {m.gen_res} --att-width {m.att_width} "
      f"--dis-width {m.dis_width}")
EOF
)"

echo "cpu_vs_peer: $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg);" \
     "size $SIZE, batch $BATCH, $STEPS steps (+$WARMUP warmup), fp32, $ROUNDS rounds, threads $THREADS"
echo "cpu_vs_peer: config $CONFIG $*; peer flags $PEER_FLAGS"

last_json() { grep '^{' | tail -n 1; }
SINGLE="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# Threads 1 is one core for both sides: XLA's flags above do not stop XLA:CPU
# from running its thunks on a second core (measured 2026-11-28: unpinned,
# "1 thread" gave the same 135 ms per step as 2 threads; pinned, 133 ms at
# half the batch), so the process is pinned to core 0 when taskset exists.
PIN1=(); command -v taskset > /dev/null && PIN1=(taskset -c 0)

# agcg at one thread setting: N (XLA's pool over N cores; 1 = one compute
# thread) or Nx1 (N processes of one compute thread each, pinned to a core
# each when taskset exists, data parallel over JAX's multi-process runtime
# with gloo: the same global batch, BATCH / N images per process).
run_agcg() {
  local threads="$1"; shift
  case "$threads" in
    *x1)
      local n="${threads%x1}" i port dir
      if [ $((BATCH % n)) -ne 0 ]; then
        echo "cpu_vs_peer: BATCH=$BATCH does not split over $n processes" >&2; exit 2
      fi
      port="$("$AGCG_PY" -c 'import socket
for p in range(29500, 29900, 2):
  try:
    for q in (p, p + 1):
      s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
    print(p); break
  except OSError: pass')"
      dir="$(mktemp -d)"
      for i in $(seq 0 $((n - 1))); do
        pin=(); command -v taskset > /dev/null && pin=(taskset -c "$((i % NPROC))")
        AGCG_DISTRIBUTED=1 AGCG_COORDINATOR="127.0.0.1:$port" AGCG_NUM_PROCESSES="$n" \
          AGCG_PROCESS_ID="$i" JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} $SINGLE" \
          "${pin[@]}" "$ROOT/.venv/bin/agcg" bench --config "$CONFIG" --size "$SIZE" \
          --batch "$((BATCH / n))" --dtype fp32 --steps "$STEPS" --warmup "$WARMUP" "$@" \
          > "$dir/$i.log" 2>&1 &
      done
      wait
      last_json < "$dir/0.log"
      rm -rf "$dir";;
    1)
      JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} $SINGLE" "${PIN1[@]}" "$ROOT/.venv/bin/agcg" bench \
        --config "$CONFIG" --size "$SIZE" --batch "$BATCH" --dtype fp32 --steps "$STEPS" \
        --warmup "$WARMUP" "$@" | last_json;;
    *)
      JAX_PLATFORMS=cpu "$ROOT/.venv/bin/agcg" bench --config "$CONFIG" --size "$SIZE" \
        --batch "$BATCH" --dtype fp32 --steps "$STEPS" --warmup "$WARMUP" "$@" | last_json;;
  esac
}
ROWS="$(mktemp)"
trap 'rm -f "$ROWS"' EXIT
for round in $(seq 1 "$ROUNDS"); do
  for threads in $THREADS; do
    row="$(run_agcg "$threads" "$@")"
    echo "agcg round $round threads $threads: $row"
    echo "agcg $threads $row" >> "$ROWS"
    # shellcheck disable=SC2086  # PEER_FLAGS is a list of flags
    # The peer has no multi-process mode: at Nx1 it runs N threads on the same cores.
    pin=(); [ "$threads" = 1 ] && pin=("${PIN1[@]}")
    row="$(CUDA_VISIBLE_DEVICES= "${pin[@]}" "$TORCH_PY" "$PEER" --size "$SIZE" --batch "$BATCH" \
             --steps "$STEPS" --warmup "$WARMUP" --threads "${threads%x1}" $PEER_FLAGS | last_json)"
    echo "peer round $round threads $threads: $row"
    echo "peer $threads $row" >> "$ROWS"
  done
done
echo "cpu_vs_peer: load at the end $(cut -d' ' -f1-3 /proc/loadavg)"

"$AGCG_PY" - "$ROWS" <<'EOF'
import collections
import json
import statistics
import sys
rate = collections.defaultdict(lambda: collections.defaultdict(list))
with open(sys.argv[1]) as f:
  for line in f:
    who, threads, row = line.split(" ", 2)
    rate[who][threads].append(json.loads(row)["images_per_s"])
best = {}
for who in ("agcg", "peer"):
  for threads, r in rate[who].items():
    print(f"{who} threads {threads}: images/s best {max(r):.2f}, mean {statistics.mean(r):.2f} "
          f"({', '.join(f'{x:.2f}' for x in r)})")
  best[who] = max(max(r) for r in rate[who].values())
print(f"best: agcg {best['agcg']:.2f}, peer {best['peer']:.2f} images/s")
print(f"ratio_vs_peer={best['agcg'] / best['peer']:.2f}")
EOF
