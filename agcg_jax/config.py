"""Loading Python config files (`get_config(arg)`) and applying overrides.

    --config configs/demo.py            get_config(None)
    --config configs/demo.py:tiny       get_config("tiny")
    --config.gan.steps=500              override one field (typed as the field)

Every problem (missing file, no get_config, unknown key, a value of the wrong
type) is a UserError naming the file or the key.
"""
import ast
import importlib.util
import json
import os
from typing import Any, Callable, Iterable

import ml_collections

from agcg_jax import files
from agcg_jax.errors import UserError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` and returns get_config(arg) as a ConfigDict."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config {spec}: no such file {path!r}")
  name = "agcg_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # A user's config file: report it in one line.
    raise UserError(f"--config {path}: failed to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise UserError(f"--config {path}: the file has no get_config() function")
  try:
    cfg = module.get_config(arg or None)
  except Exception as e:
    raise UserError(f"--config {spec}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"--config {path}: get_config() must return an ml_collections.ConfigDict")
  return cfg


def _known_keys(cfg, prefix="") -> list[str]:
  out = []
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += _known_keys(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses `text` to the type of the field's current value."""
  def bad(what):
    return UserError(f"--config.{key}={text}: {what}")
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise bad("expected true or false")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      try:
        f = float(text)
      except ValueError:
        raise bad("expected an integer") from None
      if f != int(f):
        raise bad("expected an integer") from None
      return int(f)
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("expected a number") from None
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise bad("expected a tuple like (1, 2, 4)") from None
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' (or '--config.a.b=value') items; unknown keys are errors."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  known = _known_keys(cfg)
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    key, eq, value = text.partition("=")
    if not eq:
      raise UserError(f"override {item!r}: expected --config.KEY=VALUE")
    if key not in known:
      section = key.rsplit(".", 1)[0] if "." in key else ""
      near = [k for k in known if section and k.startswith(section + ".")]
      hint = f"; keys under {section}: {', '.join(near)}" if near else ""
      raise UserError(f"unknown config key {key!r} (from {item!r}){hint}")
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = _parse_value(key, value, node[leaf])
  return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def section_dict(cfg: ml_collections.ConfigDict, sections: Iterable[str]) -> dict:
  """The named top-level sections as plain, JSON-normal dicts (tuples become lists)."""
  return json.loads(json.dumps({s: cfg[s].to_dict() if isinstance(cfg[s], ml_collections.ConfigDict)
                                else cfg[s] for s in sections}, default=list))


def check_or_record(cfg, sections: Iterable[str], path: str,
                    may_change: Callable[[str, Any, Any], bool] | None = None) -> list[str]:
  """Records the given config sections at `path`, or checks they match a previous record.

  A workdir holding a run of another config is an error (resuming it with
  other settings would silently mix two experiments). Keys for which
  `may_change(key, recorded, current)` is true (e.g. a stage's `steps`, made
  larger to train longer) may differ: the record is then updated.

  Returns:
    The changes recorded, as "key: old -> new" (empty for a new or same record).
  """
  sections = list(sections)
  current = section_dict(cfg, sections)
  changed = []
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{path}: unreadable run config ({e}); remove it or use another --workdir") from e
    diffs = diff_keys(previous, current)
    allowed = [k for k in diffs if may_change is not None
               and may_change(k, get_dotted(previous, k), get_dotted(current, k))]
    refused = [k for k in diffs if k not in allowed]
    if refused:
      shown = ", ".join(refused[:6]) + (" ..." if len(refused) > 6 else "")
      raise UserError(f"workdir {os.path.dirname(path) or '.'} holds a run of another config "
                      f"(differs in {shown}); use a new --workdir or the same config")
    if not allowed:
      return []
    changed = [f"{k}: {get_dotted(previous, k)!r} -> {get_dotted(current, k)!r}" for k in allowed]
  files.write_json(path, current, sort_keys=True)
  return changed


def get_dotted(tree, dotted: str):
  for part in dotted.split("."):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def diff_keys(a, b, prefix="") -> list[str]:
  """Dotted keys where two JSON-like trees differ (present in one only, or unequal)."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]


# ------------------------------------------------------------------ the schema


def base() -> ml_collections.ConfigDict:
  """The config schema shared by every config file (configs/*.py), with full-size defaults.

  Each config file's get_config() starts from `base()` and changes fields.
  Batch sizes are per device: the global batch is batch_per_device x the
  number of devices (the paper's batch 1 = one image per device). With D
  devices the effective batch grows D-fold; the learning rates are the
  paper's for its batch and are left as they are (Adam is insensitive to
  gradient scale; if a large data-parallel run diverges, lower them or set
  global_batch).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = d = ml_collections.ConfigDict()
  d.kind = "phantoms"          # "phantoms", "nih", "folders" or "ctr_masks"
  d.dir = ""                   # where `agcg prepare` writes datasets; "" = <workdir>/data. The
                               # dataset used is derived from the options below (workdir.py).
  d.image_size = 256
  d.num_train = 4000           # phantoms only
  d.num_test = 1000            # phantoms only
  d.workers = 0                # Grain worker processes (0: in-process)
  d.nih = n = ml_collections.ConfigDict()  # NIH ChestX-ray14 cohort (`agcg prepare`, data.kind=nih)
  n.source = ""                # the NIH download: label file beside images/ (or Kaggle's images_0NN/)
  n.views = "both"             # both | PA | AP
  n.split = "patient"          # patient (patient-disjoint 80/20) | paper (80/20 by image) | official
  n.balance = "undersample"    # undersample (the paper's adjusted training set) | none
  n.seed = 0                   # seeds the split and the undersampling
  n.strict = False             # fail on a missing or unreadable image instead of skipping it
  n.workers = 0                # conversion processes; 0: every core
  n.normalize = "none"         # none | equalize | clahe: intensity normalisation in the records
  n.controls = ""              # cohort controls, comma-separated: one_per_patient, match_age_sex
  d.folders = f = ml_collections.ConfigDict()  # class folders: <source>/<class>/*.png (data.kind=folders)
  f.source = ""                # the root; <source>/{train,test}/<class>/ keeps its own split
  f.no_finding = "no_finding,no finding,normal"  # folder names of class 0, comma-separated
  f.cardiomegaly = "cardiomegaly"                # folder names of class 1
  f.ignore = ""                # folder names to skip, comma-separated
  f.test_fraction = 0.2        # the stratified split by image when the root has no split folders
  f.seed = 0
  f.normalize = "none"         # none | equalize (histogram) | clahe (needs scikit-image)
  f.strict = False             # fail on an unreadable image instead of skipping and counting it
  f.workers = 0                # decoding processes; 0: every core
  d.ctr_masks = o = ml_collections.ConfigDict()  # outlined radiographs (data.kind=ctr_masks)
  o.source = "../shared/ctr_wingspan"  # png/<id>.png + mask/{heart,left_lung,right_lung}/<id>.png
  o.test_fraction = 0.25       # held-out share of each class (each file is one patient)
  o.threshold = 0.5            # label Cardiomegaly iff the drawn CTR > threshold (PA film)
  o.seed = 0
  o.strict = False             # fail on a bad case (missing/empty mask, size mismatch) instead of skipping it
  o.normalize = "none"         # none | equalize | clahe

  # Where `agcg evaluate` scores the run: eval_data.kind "" = the test split of `data`;
  # otherwise another dataset described like `data` (at data.image_size), e.g. trained on a
  # class-folder set and scored on NIH images with expert boxes or on outlined hearts.
  c.eval_data = ml_collections.ConfigDict(d.to_dict())
  c.eval_data.kind = ""

  c.model = m = ml_collections.ConfigDict()
  m.dtype = "float32"          # compute dtype: float32 or bfloat16 (params stay float32)
  m.padding = "reflect"
  m.conv_rewrites = "auto"     # auto (on for the CPU backend) | on | off: exact faster convs, models/conv_rewrites.py
  m.gen_width = 64             # c7s1-64, d128, d256
  m.gen_down = 2
  m.gen_res = 9
  m.gen_upsample = "subpixel"  # subpixel | transpose | resize
  m.att_width = 32
  m.att_dilations = (1, 2, 4, 1)
  m.dis_width = 64             # 70x70 PatchGAN
  m.dis_layers = 3
  m.dis_sigmoid = False        # hinge loss wants raw logits (DESIGN.md)
  m.cls_width = 64             # classifier trunk = discriminator trunk
  m.cls_layers = 3
  m.cls_norm = "instance"       # instance | none: the classifier trunk's normalisation (docs/benchmarks.md, CAM)

  c.classifier = k = ml_collections.ConfigDict()
  k.batch_per_device = 8
  k.global_batch = 0           # > 0: explicit global batch (must divide by the devices)
  k.steps = 5000
  k.lr = 3.2e-3
  k.b1 = 0.5
  k.b2 = 0.9
  k.decay_start = 1.0          # fraction of steps before linear decay to 0; 1 = constant
  k.class_weights = False      # weight the loss by inverse class frequency (unbalanced training sets)
  k.log_every = 50
  k.ckpt_every = 500
  k.keep = 3

  c.gan = g = ml_collections.ConfigDict()
  g.batch_per_device = 1
  g.global_batch = 0
  g.steps = 100000
  g.replicate = 0               # > 0: another init and data order of the GAN alone (the classifier
                                # and the data unchanged), to measure the run-to-run spread
  g.lr_g = 1e-4
  g.lr_a = 1e-4
  g.lr_d = 4e-4
  g.b1 = 0.5
  g.b2 = 0.9
  g.decay_start = 0.5          # constant, then linear decay to 0 (original AG-CycleGAN code)
  g.adv_loss = "hinge"         # hinge | lsgan | bce
  g.cycle_loss = "mse"         # mse | l1
  g.lambda_cycle = 10.0
  g.lambda_identity = 0.0
  g.lambda_attention_l1 = 0.0   # not in the paper: sparsity of the attention map (GANimation)
  g.lambda_attention_tv = 0.0   # not in the paper: smoothness of the attention map
  g.attention_target = 0.0       # > 0: the L1 prior draws each image's mean attention to this
                                # amount instead of to 0 (losses.attention_amount)
  g.attention_prior_start = 1.0   # both priors start at this fraction of their weight and grow
  g.attention_prior_ramp = 0.0    # linearly to it over this fraction of the run (0 = constant)
  g.two_stage_start = 1.0       # original AG-CycleGAN: from this fraction of the run on, freeze
                                # attention and show D only the attended region; 1 = never (paper)
  g.attention_threshold = 0.1   # tau of that second stage
  g.log_every = 100
  g.ckpt_every = 2000
  g.keep = 3

  c.ctr = r = ml_collections.ConfigDict()   # CTR regressor (phantoms): measures translated hearts
  r.batch_per_device = 16
  r.steps = 2000
  r.lr = 1e-3
  r.width = 32
  r.layers = 3
  r.log_every = 100

  # The heart-and-lung segmenter (segment.py): the CTR ruler of real radiographs, trained on
  # the training masks of an outlined set (data or eval_data of kind ctr_masks).
  c.segmenter = sg = ml_collections.ConfigDict()
  sg.steps = 1000
  sg.lr = 3e-3
  sg.width = 8
  sg.depth = 4
  sg.patch = 1                 # > 1 folds patches into channels (2 at 128 px costs what 1 does at 64)
  sg.batch_per_device = 16
  sg.augment = True            # exposure and framing jitter, masks moved with the image
  sg.log_every = 50

  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 32
  e.max_examples = 0           # 0 = the whole test set
  e.cam = "margin"             # the scored/shown decision map: "margin" (headline) or "equ9" (cam.py)
  e.truth_threshold_grey = 8.0 # phantom truth: body pixels where the twin differs by more (of 255)
  e.num_figure_examples = 4
  e.audit_images = 2000        # training images the confounder audit (audit.py) reads; 0: no audit
  return c
