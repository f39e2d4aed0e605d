"""A run directory: one function per path, and the one place that records or checks a stage's config.

    <workdir>/
      data/<builder>/<config>/<version>/   the prepared dataset (unless data.dir names another root)
      <stage>/checkpoints/                 Orbax steps (classifier, ctr, gan)
      <stage>/metrics.jsonl                one JSON object per logged step
      <stage>/config.json                  the config sections the stage was trained with
      <stage>/tensorboard/                 the same scalars as TensorBoard event files
      eval/examples.npz                    the figure cases (examples.ExampleMaps)
      compile_cache/                       XLA's persistent compilation cache (a re-run does not recompile)
      metrics.json                         what `agcg evaluate` measured
      figures/, report.html                what `agcg explain` drew
      explained/                           `agcg explain --image` outputs

The dataset a config trains on is derived from its options (kind, size,
counts or cohort options, seed): `dataset_dir` names exactly one prepared
dataset, so a prepared set and a config cannot silently disagree.
"""
import json
import os
from typing import Any

import ml_collections

from agcg_jax import config as config_lib
from agcg_jax.errors import UserError

STAGES = ("classifier", "gan", "ctr", "segmenter")
# Config sections that define each stage's training; a workdir trained with
# other values for these refuses to resume.
STAGE_SECTIONS = {
    "classifier": ("seed", "data", "classifier"),
    "gan": ("seed", "data", "gan"),
    "ctr": ("seed", "data", "ctr"),
    "segmenter": ("seed", "data", "eval_data", "segmenter"),
}
MODEL_FIELDS = {
    "classifier": ("dtype", "cls_width", "cls_layers", "cls_norm"),
    "gan": ("dtype", "padding", "gen_width", "gen_down", "gen_res", "gen_upsample",
            "att_width", "att_dilations", "dis_width", "dis_layers", "dis_sigmoid"),
    "ctr": ("dtype",),  # its widths live in config.ctr (recorded with that section)
    "segmenter": (),    # its widths live in config.segmenter
}
# Fields of a stage's own section that may differ from its record: they change
# how long the run is, or how often it logs and saves, never what it learns
# up to the steps already trained. `steps` may only grow.
RESUMABLE_FIELDS = ("steps", "log_every", "ckpt_every", "keep")


# ------------------------------------------------------------------ paths


def data_root(config, workdir: str) -> str:
  """Where `agcg prepare` writes datasets: data.dir, or <workdir>/data."""
  return config.data.dir or os.path.join(workdir, "data")


def dataset_name(config) -> tuple[str, str, str]:
  """(TFDS builder name, config name, version) of the dataset `config` asks for."""
  d = config.data
  if d.kind == "phantoms":
    from agcg_jax.data import tfds_phantoms  # pylint: disable=g-import-not-at-top
    b = tfds_phantoms.PhantomChestXray
    return b.name, tfds_phantoms.config_name(d.image_size, d.num_train, d.num_test,
                                             config.seed), str(b.VERSION)
  if d.kind == "nih":
    from agcg_jax.data import nih  # pylint: disable=g-import-not-at-top
    from agcg_jax.data import tfds_nih  # pylint: disable=g-import-not-at-top
    n, b = d.nih, tfds_nih.NihChestXray14
    return b.name, nih.config_name(d.image_size, n.views, n.split, n.balance,
                                   n.seed, n.normalize, n.controls), str(b.VERSION)
  if d.kind == "folders":
    from agcg_jax.data import folders  # pylint: disable=g-import-not-at-top
    from agcg_jax.data import tfds_folders  # pylint: disable=g-import-not-at-top
    f, b = d.folders, tfds_folders.ClassFolderXray
    layout = folders.layout_of(f.source, split_names(f.ignore))
    return b.name, folders.config_name(d.image_size, f.normalize, layout, f.test_fraction,
                                       f.seed), str(b.VERSION)
  if d.kind == "ctr_masks":
    from agcg_jax.data import tfds_outlines  # pylint: disable=g-import-not-at-top
    o, b = d.ctr_masks, tfds_outlines.OutlinedChestXray
    return b.name, tfds_outlines.config_name(d.image_size, o.seed, o.test_fraction, o.threshold,
                                             o.normalize), str(b.VERSION)
  raise UserError(f"data.kind must be 'phantoms', 'nih', 'folders' or 'ctr_masks', not {d.kind!r}")


def split_names(text: str) -> tuple[str, ...]:
  """"a, b,c" -> ("a", "b", "c"): the comma-separated folder names of a config field."""
  return tuple(n.strip() for n in str(text).split(",") if n.strip())


def eval_config(config):
  """The config whose `data` is what `agcg evaluate` scores: `eval_data` when its kind is set."""
  if not config.get("eval_data") or not config.eval_data.kind:
    return config
  out = config.copy_and_resolve_references()
  out.data = out.eval_data
  out.data.image_size = config.data.image_size  # the size the networks are built for
  return out


def masks_config(config):
  """The config whose `data` is an outlined set (kind ctr_masks): `config` or its eval_config; or None."""
  for c in (config, eval_config(config)):
    if c.data.kind == "ctr_masks":
      return c
  return None


def dataset_dir(config, workdir: str, must_exist: bool = True) -> str:
  """The version folder of the prepared dataset that `config` describes.

  Raises:
    UserError (must_exist): it is not prepared; the message names what the
      data root holds instead and the command that prepares it.
  """
  root = data_root(config, workdir)
  builder, name, version = dataset_name(config)
  path = os.path.join(root, builder, name, version)
  if must_exist and not os.path.isfile(os.path.join(path, "dataset_info.json")):
    others = sorted(os.path.relpath(os.path.join(dirpath), root)
                    for dirpath, _, names in os.walk(root) if "dataset_info.json" in names
                    and "incomplete." not in dirpath) if os.path.isdir(root) else []
    there = (f" (it holds {', '.join(others)}: prepared with other options or by another "
             "version)" if others else "")
    raise UserError(f"no prepared dataset {builder}/{name}/{version} in {root}{there}; run "
                    "`agcg prepare --config ...` with this config first")
  return path


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def checkpoints_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "checkpoints")


def training_log(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "metrics.jsonl")


def events_dir(workdir: str, stage: str) -> str:
  """TensorBoard event files of a stage's training scalars (`tensorboard --logdir <workdir>`)."""
  return os.path.join(workdir, stage, "tensorboard")


def stage_config(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "config.json")


def metrics_json(workdir: str | os.PathLike) -> str:
  return os.path.join(workdir, "metrics.json")


def examples_npz(workdir: str | os.PathLike) -> str:
  return os.path.join(workdir, "eval", "examples.npz")


def per_image_csv(workdir: str | os.PathLike, process: int = 0, count: int = 1) -> str:
  """One row per scored image (evaluate.py); one file per process when there are several."""
  return os.path.join(workdir, "eval", "per_image.csv" if count == 1 else f"per_image-{process}.csv")


def figures_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(workdir, "figures")


def report_html(workdir: str | os.PathLike) -> str:
  return os.path.join(workdir, "report.html")


def explained_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(workdir, "explained")


# --------------------------------------------------- a stage's config record


# Sub-sections of `data` (and `eval_data`) that describe one kind each: only the active kind's
# is part of a run's record, so options of kinds a run does not use never block it.
KIND_SECTIONS = ("nih", "folders", "ctr_masks")


def _active_kind_only(data: dict) -> dict:
  return {k: v for k, v in data.items() if k not in KIND_SECTIONS or k == data.get("kind")}


def stage_record(config, stage: str) -> dict[str, Any]:
  """What `<stage>/config.json` holds: the stage's sections and the fields of its networks."""
  sections = dict(config_lib.section_dict(config, STAGE_SECTIONS[stage]))
  for name in ("data", "eval_data"):
    if name in sections:
      sections[name] = _active_kind_only(sections[name])
  sections["model"] = json.loads(json.dumps({k: config.model[k] for k in MODEL_FIELDS[stage]},
                                            default=list))
  return sections


def _default(key: str):
  """The schema's default of a dotted key (JSON-normal), or None."""
  return config_lib.get_dotted(config_lib.section_dict(config_lib.base(), [key.partition(".")[0]]), key)


def _may_change(stage: str):
  def allowed(key, recorded, current) -> bool:
    section, _, field = key.partition(".")
    if (section in ("data", "eval_data") and field.partition(".")[0] in KIND_SECTIONS
        and current is None):
      return True  # an older record listed every kind's options: drop the unused ones
    if recorded is None and section in (*STAGE_SECTIONS[stage], "model") and current == _default(key):
      return True  # a field added since the run began, at its default: the run is unchanged
    if section != stage or field not in RESUMABLE_FIELDS:
      return False
    if field == "steps":
      return isinstance(recorded, int) and isinstance(current, int) and current > recorded
    return True
  return allowed


def record_stage_config(config, workdir: str, stage: str) -> list[str]:
  """Records the stage's config in <workdir>/<stage>/config.json, or checks the run's record.

  A larger `<stage>.steps` (or other RESUMABLE_FIELDS) updates the record:
  the run is continued to the new total (train.py's docstring).

  Returns:
    The changes recorded ("key: old -> new"); empty for a new or equal record.

  Raises:
    UserError: the workdir holds a run of another config.
    OSError: the record could not be written.
  """
  record = stage_record(config, stage)
  return config_lib.check_or_record(ml_collections.ConfigDict(record), list(record),
                                    stage_config(workdir, stage), may_change=_may_change(stage))


def check_trained_networks(config, workdir: str, stage: str) -> None:
  """The networks in a workdir must be those the config describes, or restoring fails deep in Orbax."""
  path = stage_config(workdir, stage)
  if config is None or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      recorded = json.load(f).get("model", {})
  except (OSError, json.JSONDecodeError):
    return
  current = stage_record(config, stage)["model"]
  diffs = [f"model.{k}={recorded[k]!r} there, {current[k]!r} here"
           for k in config_lib.diff_keys(recorded, current) if k in recorded and k in current]
  if diffs:
    raise UserError(f"the {stage} in {stage_dir(workdir, stage)} was trained with other networks "
                    f"({'; '.join(diffs)}): use the config it was trained with")


def check_image_size(config, ddir: str) -> None:
  """The prepared images must have the size the networks are built for."""
  from agcg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  size = pipeline.dataset_info(ddir).get("image_size")
  if size is not None and int(size) != int(config.data.image_size):
    raise UserError(f"dataset in {ddir} holds {size}x{size} images but data.image_size="
                    f"{config.data.image_size}; set --config.data.image_size={size} or prepare again")


# ------------------------------------------------------- reading a finished run


def load_metrics(workdir: str | os.PathLike) -> dict[str, Any]:
  """The evaluation metrics of a run: `<workdir>/metrics.json` as a dict.

  Raises:
    UserError: the file is missing or is not a JSON object.
  """
  path = metrics_json(workdir)
  if not os.path.isfile(path):
    raise UserError(f"{path} not found: run `agcg evaluate` first")
  try:
    with open(path) as f:
      metrics = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}): run `agcg evaluate` again") from e
  if not isinstance(metrics, dict):
    raise UserError(f"{path} is not a JSON object: run `agcg evaluate` again")
  return metrics


def load_examples(workdir: str | os.PathLike):
  """The example cases of a run: `<workdir>/eval/examples.npz` (no pickles loaded).

  Raises:
    UserError: the file is missing or is not an examples file; the message names it.
  """
  from agcg_jax.examples import ExampleMaps  # pylint: disable=g-import-not-at-top
  path = examples_npz(workdir)
  if not os.path.isfile(path):
    raise UserError(f"{path} not found: run `agcg evaluate` first")
  try:
    return ExampleMaps.load(path)
  except (OSError, ValueError, KeyError) as e:
    message = " ".join(str(e).split())
    raise UserError(f"{path} is unreadable ({message}): run `agcg evaluate` again") from e


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl file; lines that do not parse (cut short by a kill) are skipped."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def load_training_logs(workdir: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
  """Stage name -> rows of `<workdir>/<stage>/metrics.jsonl`, for the stages that have one."""
  logs = {}
  for stage in STAGES:
    path = training_log(os.fspath(workdir), stage)
    if os.path.isfile(path):
      logs[stage] = load_jsonl(path)
  return logs
