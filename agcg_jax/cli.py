"""`agcg`: one command-line tool for the whole job. Argument parsing only.

    agcg demo --config configs/demo.py --workdir runs/demo
    agcg train-gan --config configs/paper.py --workdir runs/nih --config.gan.steps=20000

Config overrides are `--config.SECTION.KEY=VALUE` (typed as the field).
"""
import argparse
import sys

from agcg_jax.errors import UserError

COMMANDS = {
    "prepare-phantoms": "generate the phantom chest X-ray dataset (TFDS array_record) into the data dir",
    "prepare-nih": "prepare the NIH ChestX-ray14 cohort (Cardiomegaly vs No Finding) from a download",
    "train-classifier": "train the CNN classifier (resumes from the workdir's checkpoints)",
    "train-ctr": "train the CTR regressor that measures translated hearts (phantoms)",
    "train-gan": "train the AG-CycleGAN: all six networks in one compiled step (resumes)",
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
      from agcg_jax.data import nih
      nih.add_prepare_nih_arguments(s)
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
    if name == "explain":
      s.add_argument("--image", nargs="*", default=[],
                     help="PNG files to explain besides the test-set cases (translated both ways)")
  return p


def _load(args, overrides):
  from agcg_jax import config as config_lib
  from agcg_jax.defaults import base
  cfg = config_lib.load_config(args.config) if args.config else base()
  return config_lib.apply_overrides(cfg, overrides)


def run(argv=None) -> int:
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  stray = [r for r in rest if not r.startswith("--config.")]
  if stray:
    parser.error(f"unrecognized arguments: {' '.join(stray)}")
  from agcg_jax import distributed
  if args.distributed or distributed.requested():
    distributed.initialize()
  if args.command == "prepare-nih":
    from agcg_jax.data import nih
    if rest:
      raise UserError("prepare-nih takes its options as flags, not --config overrides: "
                      + " ".join(rest))
    nih.run_prepare_nih(args)
    return 0
  config = _load(args, rest)
  from agcg_jax import pipeline_runs
  if args.command == "bench":
    from agcg_jax import bench
    rows = bench.main(config, args)
    if args.out:
      import json
      with open(args.out, "a") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
    return 0
  return pipeline_runs.run_command(args.command, config, args.workdir,
                                   images=getattr(args, "image", []))


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
