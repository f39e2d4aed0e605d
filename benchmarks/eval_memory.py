"""Host memory of `agcg evaluate` as the test set grows (issue: metrics on the device).

    .venv/bin/python benchmarks/eval_memory.py --workdir runs/demo --num-test 1000 10000

For each N, prepares N phantom test images (with their twins; 64 training
images for the prior) at the demo size into --data-root, then runs
`agcg evaluate` on the trained run in --workdir in a fresh process and reads
its peak resident set size (ru_maxrss of the child). Prints one line per N
and the ratio of the largest to the smallest. Flat means the per-image work
stays on the device and only per-batch sums come to the host.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished demo run (configs/demo.py)")
  p.add_argument("--num-test", type=int, nargs="+", default=[1000, 10000])
  p.add_argument("--data-root", default="/tmp/agcg_eval_memory")
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
  args = p.parse_args()
  sys.path.insert(0, ROOT)
  from agcg_jax.data import tfds_phantoms

  rows = []
  for n in args.num_test:
    data = os.path.join(args.data_root, f"t{n}")
    t0 = time.perf_counter()
    tfds_phantoms.prepare_phantoms(data, size=64, num_train=64, num_test=n, seed=0)
    prep = time.perf_counter() - t0
    # A fresh interpreter runs the CLI and prints its own peak RSS last.
    code = ("import resource, sys\n"
            "from agcg_jax import cli\n"
            "rc = cli.run(sys.argv[1:])\n"
            "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "sys.exit(rc)\n")
    cmd = [sys.executable, "-c", code, "evaluate", "--config", args.config,
           "--workdir", args.workdir, f"--config.data.dir={data}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
      sys.exit(f"evaluate failed for N={n}: {proc.stderr[-2000:]}")
    peak = int(proc.stdout.split("maxrss_kib")[-1].split()[0]) / 1024
    rows.append((n, peak, wall, prep))
    print(f"N={n:6d}  peak RSS {peak:7.1f} MiB  evaluate {wall:6.1f} s "
          f"({n / wall:6.1f} images/s incl. start-up)  prepare {prep:6.1f} s", flush=True)
  if len(rows) > 1:
    print(f"peak RSS ratio N={rows[-1][0]} / N={rows[0][0]}: {rows[-1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
  main()
