"""`agcg`: one command-line tool for the whole job: argument parsing and the dispatch
table (what each command does is in commands.py).

    agcg demo --config configs/demo.py --workdir runs/demo
    agcg prepare --config configs/paper.py --workdir runs/paper --config.data.nih.source=$NIH
    agcg train-gan --config configs/paper.py --workdir runs/nih --config.gan.steps=20000

Config overrides are `--config.SECTION.KEY=VALUE` (typed as the field).
"""
import argparse
import json
import os
import sys

from agcg_jax.errors import UserError

COMMANDS = {
    "prepare": "prepare the datasets the config describes (data.kind: phantoms, nih, folders, "
               "ctr_masks; and eval_data) into data.dir",
    "prepare-phantoms": "the same as `prepare` for data.kind=phantoms (kept for old scripts)",
    "prepare-nih": "prepare an NIH ChestX-ray14 cohort from flags (`prepare` with data.nih does the same)",
    "train-classifier": "train the CNN classifier (resumes from the workdir's checkpoints)",
    "train-ctr": "train the CTR regressor that measures translated hearts (phantoms)",
    "train-gan": "train the AG-CycleGAN: all six networks in one compiled step (resumes)",
    "train-segmenter": "train the heart-and-lung segmenter, the CTR ruler of outlined radiographs",
    "evaluate": "classifier on original and translated test images, CAM, attention, metrics.json",
    "explain": "figures (paper Fig. 4 and 5) and report.html from an evaluated run",
    "demo": "everything above on built-in phantoms, sized for a CPU",
    "bench": "images/s and compile time of the AG-CycleGAN training step",
}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="agcg",
      description="Explain a chest X-ray classifier (Cardiomegaly vs No Finding) with an "
                  "Attention-Guided CycleGAN: where the classes differ (attention), what differs "
                  "(translation), and whether the classifier reads the same difference (CAM, "
                  "accuracy on translated images).",
      epilog="Config overrides: --config.SECTION.KEY=VALUE, e.g. --config.gan.steps=500.")
  p.add_argument("--distributed", action="store_true",
                 help="start JAX's multi-process runtime (also AGCG_DISTRIBUTED=1); see launch/")
  sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name, text in COMMANDS.items():
    s = sub.add_parser(name, help=text, description=text,
                       epilog="Config overrides: --config.SECTION.KEY=VALUE")
    if name == "prepare-nih":
      _add_prepare_nih_arguments(s)
      continue
    s.add_argument("--config", default=None if name == "bench" else "configs/demo.py",
                   help="Python config file with get_config(), optionally FILE:VARIANT "
                        "(default: %(default)s)")
    s.add_argument("--workdir", default=None if name == "bench" else "runs/demo",
                   help="run directory: data, checkpoints, metrics, figures (default: %(default)s)")
    if name == "bench":
      s.add_argument("--size", type=int, default=256, help="image size (default 256)")
      s.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="per-device batch sizes")
      s.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
      s.add_argument("--steps", type=int, default=20, help="timed steps")
      s.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
      s.add_argument("--out", default=None, help="append the JSON rows to this file")
      s.add_argument("--profile", default=None, metavar="DIR",
                     help="write a jax.profiler trace of the timed steps into DIR")
      s.add_argument("--input", default=None, metavar="DATA",
                     help="measure the input pipeline alone over the prepared dataset DATA")
      s.add_argument("--workers", type=int, nargs="+", default=[0],
                     help="with --input: Grain worker counts to measure (default 0)")
    if name == "explain":
      s.add_argument("--image", nargs="*", default=[],
                     help="PNG files to explain besides the test-set cases (translated both ways)")
  return p


def _add_prepare_nih_arguments(parser: argparse.ArgumentParser) -> None:
  """`agcg prepare-nih`: the NIH cohort options as flags (the config's data.nih holds the same)."""
  parser.add_argument("--data-dir", required=True,
                      help="the NIH ChestX-ray14 download: the label file "
                      "beside images/ (NIH) or images_001/images/ ... "
                      "(Kaggle); a partial download is fine")
  parser.add_argument("--out", required=True,
                      help="output folder: cache/, the TFDS dataset, "
                      "cohort.json")
  parser.add_argument("--size", type=int, default=256,
                      help="stored image side in pixels (default 256)")
  parser.add_argument("--views", choices=("both", "PA", "AP"), default="both",
                      help="view positions to keep (default both)")
  parser.add_argument("--split", choices=("patient", "paper", "official"), default="patient",
                      help="patient: patient-disjoint 80/20 (default); "
                      "paper: 80/20 by image, the paper's Table 1; "
                      "official: NIH's train_val_list.txt / test_list.txt")
  parser.add_argument("--balance", choices=("undersample", "none"),
                      default="undersample",
                      help="undersample: cut the larger training class to "
                      "the smaller's count (the paper's adjusted set, "
                      "default); none: keep all, record class weights")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the split and the undersampling")
  parser.add_argument("--strict", action="store_true",
                      help="fail on missing or unreadable images instead of "
                      "skipping them")
  parser.add_argument("--workers", type=int, default=None,
                      help="conversion processes (default: every core)")


def _load(args, overrides):
  from agcg_jax import config as config_lib
  cfg = config_lib.load_config(args.config) if args.config else config_lib.base()
  return config_lib.apply_overrides(cfg, overrides)


def _prepare_phantoms(config, workdir, args):
  from agcg_jax import commands
  if config.data.kind != "phantoms":
    raise UserError(f"prepare-phantoms: data.kind is {config.data.kind!r}; use `agcg prepare` "
                    "(it prepares any kind) or --config.data.kind=phantoms")
  print(f"agcg: phantom dataset ready in {commands.prepare(config, workdir)}")
  return 0


def _prepare(config, workdir, args):
  from agcg_jax import commands
  print(f"agcg: dataset ready in {commands.prepare(config, workdir)}")
  return 0


def _bench(config, workdir, args):
  from agcg_jax import bench
  if args.input:
    from agcg_jax import input_bench
    rows = []
    for workers in args.workers:
      for b in args.batch:
        row = input_bench.input_throughput(args.input, batch_size=b, worker_count=workers,
                                           seconds=10.0)
        print(json.dumps(row), flush=True)
        rows.append(row)
  else:
    rows = bench.main(config, size=args.size, batches=args.batch, dtypes=args.dtype,
                      steps_n=args.steps, warmup=args.warmup, profile_dir=args.profile)
  if args.out:
    with open(args.out, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return 0


def _train(stage):
  def run_stage(config, workdir, args):
    from agcg_jax import commands
    return commands.train_stage(stage, config, workdir)
  return run_stage


def _evaluate(config, workdir, args):
  from agcg_jax import commands
  return commands.evaluate(config, workdir)


def _explain(config, workdir, args):
  from agcg_jax import commands
  print(f"agcg: report written to {commands.explain(config, workdir, args.image)}")
  return 0


def _demo(config, workdir, args):
  from agcg_jax import commands
  return commands.demo(config, workdir)


def _compilation_cache(workdir: str) -> None:
  """XLA's persistent compilation cache in <workdir>/compile_cache: a re-run does not recompile.

  $JAX_COMPILATION_CACHE_DIR, when set, wins (the test suite shares one); so does
  $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (default here: 1 s).
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir),
                                                              "compile_cache"))
  if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # skip trivial ones


# Command -> fn(config, workdir, args) -> exit status. Imports are deferred so
# that `agcg --help` and argument errors stay instant.
DISPATCH = {
    "prepare": _prepare,
    "prepare-phantoms": _prepare_phantoms,
    "train-classifier": _train("classifier"),
    "train-ctr": _train("ctr"),
    "train-gan": _train("gan"),
    "train-segmenter": _train("segmenter"),
    "evaluate": _evaluate,
    "explain": _explain,
    "demo": _demo,
    "bench": _bench,
}


def run(argv=None) -> int:
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  stray = [r for r in rest if not r.startswith("--config.")]
  if stray:
    parser.error(f"unrecognized arguments: {' '.join(stray)}")
  from agcg_jax import distributed
  if args.distributed or distributed.requested():
    distributed.initialize()
  from agcg_jax import commands
  if args.command == "prepare-nih":
    if rest:
      raise UserError("prepare-nih takes its options as flags, not --config overrides: "
                      + " ".join(rest) + " (or use `agcg prepare --config ...` with data.nih)")
    commands.prepare_nih(args.data_dir, args.out, size=args.size, views=args.views,
                         split=args.split, balance=args.balance, seed=args.seed,
                         strict=args.strict, workers=args.workers)
    return 0
  config = _load(args, rest)

  def dispatch():
    if args.workdir is not None:
      os.makedirs(args.workdir, exist_ok=True)
      _compilation_cache(args.workdir)
    return DISPATCH[args.command](config, args.workdir, args)
  return commands.guard_writes(args.command, args.workdir, dispatch)


def main(argv=None) -> None:
  try:
    code = run(argv)
  except UserError as e:
    print(f"agcg: error: {e}", file=sys.stderr)
    code = 2
  except KeyboardInterrupt:
    print("agcg: interrupted", file=sys.stderr)
    code = 130
  sys.exit(code)


if __name__ == "__main__":
  main()
