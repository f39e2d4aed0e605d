"""TFDS builder `outlined_chest_xray`: outlined radiographs as array_record.

Built by `prepare_outlines` from a folder laid out like ../shared/ctr_wingspan
(see `outlines.py`): real radiographs whose heart and lungs were outlined by
hand, so every record carries its true cardiothoracic ratio and the masks it
was measured from:

  image:      uint8 [S, S, 1], the common record (`records.py`)
  label:      int64, 1 (Cardiomegaly) iff ctr > threshold
  id:         str, the PNG's file name
  heart_mask: uint8 [S, S, 1] in {0, 1}
  lung_mask:  uint8 [S, S, 1] in {0, 1}, both lungs
  ctr:        float32, measured on the full-resolution masks

Read it back without this module: `tfds.builder_from_directory(
<out_dir>/outlined_chest_xray/<config>/1.0.0).as_data_source(split)`, or
`pipeline.open_source(<out_dir>, split)`.

No TensorFlow: every array feature is a `Tensor` fed numpy (an `Image`
feature fed an array would call `tf.image.encode_png`), and `DatasetInfo` is
built with `builder=self`.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from agcg_jax import files
from agcg_jax import progress
from agcg_jax.data import images
from agcg_jax.data import outlines
from agcg_jax.data import records
from agcg_jax.errors import UserError

REPORT_NAME = "outlines.json"
Prepared = tuple[dict[str, list[outlines.Measured]], dict[str, Any]]


def _percent(x: float) -> str:
  # "0.25" -> "25", "0.333" -> "33p3": a file-name-safe token.
  return f"{100 * x:.6g}".replace(".", "p")


def config_name(size: int, seed: int, test_fraction: float,
                threshold: float, normalize: str = "none") -> str:
  """The config (and directory) name of an outlined dataset's options."""
  name = (f"s{size}_seed{seed}_test{_percent(test_fraction)}"
          f"_ctr{_percent(threshold)}")
  return name if normalize == "none" else f"{name}_{normalize}"


@dataclasses.dataclass(eq=False)
class OutlineConfig(tfds.core.BuilderConfig):
  """Options of an outlined dataset; the config name is derived from them."""
  size: int = 64
  seed: int = 0
  test_fraction: float = outlines.TEST_FRACTION
  threshold: float = outlines.CTR_THRESHOLD
  normalize: str = "none"

  @classmethod
  def make(cls, *, size: int = 64, seed: int = 0,
           test_fraction: float = outlines.TEST_FRACTION,
           threshold: float = outlines.CTR_THRESHOLD,
           normalize: str = "none") -> "OutlineConfig":
    return cls(
        name=config_name(size, seed, test_fraction, threshold, normalize),
        description=(f"{size}x{size}, test fraction {test_fraction} "
                     f"stratified by label, seed {seed}, label CTR > "
                     f"{threshold}, intensity {normalize}"),
        size=size, seed=seed, test_fraction=test_fraction,
        threshold=threshold, normalize=normalize)


def _metadata(report: dict[str, Any]) -> dict[str, Any]:
  """What readers of the dataset may want from the report (metadata.json)."""
  return {"fingerprint": report["fingerprint"], "counts": report["counts"],
          "ctr_threshold": report["options"]["threshold"]}


class OutlinedChestXray(tfds.core.GeneratorBasedBuilder):
  """Real chest radiographs with hand-drawn heart and lung masks and the CTR."""

  name = "outlined_chest_xray"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [OutlineConfig.make()]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Point manual_dir at a folder holding png/<id>.png and
  mask/heart|left_lung|right_lung/<id>.png (e.g. ../shared/ctr_wingspan).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds a builder's file through `importlib_resources`, a
    # backport it installs only on Python < 3.9: without this override
    # download_and_prepare fails with ModuleNotFoundError on 3.11+.
    return epath.Path(__file__)

  def __init__(self, *, prepared: Prepared | None = None, **kwargs):
    """Creates the builder.

    Args:
      prepared: (splits, report) from `prepare_cases`; None: the builder
        scans the manual_dir itself (skipping bad cases).
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (config, data_dir).
    """
    self._prepared = prepared
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    # Raw bytes: the default encoding writes each pixel as an int64 varint.
    array = lambda shape, dtype: tfds.features.Tensor(
        shape=shape, dtype=dtype, encoding="bytes")
    metadata = tfds.core.MetadataDict()
    if self._prepared is not None:
      metadata.update(_metadata(self._prepared[1]))
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Real frontal chest radiographs (grayscale uint8) with "
            "hand-drawn heart and lung masks (0/1, both lungs in one) and "
            "the cardiothoracic ratio measured on the full-resolution "
            "masks; label Cardiomegaly iff CTR > the config's threshold."),
        features=tfds.features.FeaturesDict({
            "image": array((size, size, 1), np.uint8),
            "label": tfds.features.ClassLabel(names=records.CLASS_NAMES),
            "id": tfds.features.Text(),
            "heart_mask": array((size, size, 1), np.uint8),
            "lung_mask": array((size, size, 1), np.uint8),
            "ctr": tfds.features.Tensor(shape=(), dtype=np.float32),
        }),
        supervised_keys=("image", "label"),
        citation=("Dong et al., Unsupervised domain adaptation for automatic "
                  "estimation of cardiothoracic ratio, MICCAI 2018."),
        metadata=metadata,
    )

  def _split_generators(self, dl_manager):
    if self._prepared is None:
      cfg = self.builder_config
      self._prepared = prepare_cases(
          os.fspath(dl_manager.manual_dir), size=cfg.size, seed=cfg.seed,
          test_fraction=cfg.test_fraction, threshold=cfg.threshold)
      self.info.metadata.update(_metadata(self._prepared[1]))
    splits = self._prepared[0]
    return {s: self._generate_examples(splits[s]) for s in outlines.SPLIT_NAMES}

  def _generate_examples(self, measured: list[outlines.Measured]):
    size, normalize = self.builder_config.size, self.builder_config.normalize
    for m in measured:
      rec = outlines.load_case(m, size)
      rec["image"] = images.normalize_image(rec["image"][..., 0], normalize)[..., None]
      yield m.case.id, rec


def _fingerprint(options: dict[str, Any],
                 splits: dict[str, list[outlines.Measured]]) -> str:
  """Changes when the options, the split or any used file changes."""
  h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
  for split in outlines.SPLIT_NAMES:
    for m in splits[split]:
      h.update(f"{split} {m.case.id} {m.label} {m.ctr:.6f}".encode())
      for path in (m.case.image, *m.case.masks):
        st = os.stat(path)
        h.update(f" {st.st_size} {st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def _check_options(size: int, seed: int, test_fraction: float,
                   threshold: float) -> None:
  if not 16 <= size <= 1024:
    raise UserError(f"--size {size}: must be within 16..1024")
  if seed < 0:
    raise UserError(f"--seed {seed}: must be >= 0")
  if not 0.0 < test_fraction < 1.0:
    raise UserError(f"--test-fraction {test_fraction}: must be within (0, 1)")
  if not 0.0 < threshold < 1.0:
    raise UserError(f"--threshold {threshold}: must be within (0, 1)")


def prepare_cases(root: str, *, size: int = 64, seed: int = 0,
                  test_fraction: float = outlines.TEST_FRACTION,
                  threshold: float = outlines.CTR_THRESHOLD,
                  strict: bool = False) -> Prepared:
  """Scans, measures and splits the cases of `root`: what the builder writes.

  Returns:
    ({"train": [Measured], "test": [Measured]}, report): the report holds
    the options, the scan's counts (cases, used, skipped by reason and the
    first skipped files), counts per split and class, the mean CTR per
    split and a fingerprint of all of it.

  Raises:
    UserError: an option out of range, no usable case, an empty split, or
      (strict) the first bad case.
  """
  _check_options(size, seed, test_fraction, threshold)
  start = time.perf_counter()
  measured, scan_report = outlines.scan(root, strict=strict,
                                        threshold=threshold)
  splits = outlines.split_cases(measured, seed=seed,
                                test_fraction=test_fraction)
  empty = [s for s in outlines.SPLIT_NAMES if not splits[s]]
  if empty:
    raise UserError(f"{len(measured)} usable cases in {root} leave the {empty[0]} "
                    f"split empty (test fraction {test_fraction})")
  options = {"root": os.path.abspath(root), "size": size, "seed": seed,
             "test_fraction": test_fraction, "threshold": threshold}
  report = {
      "dataset": OutlinedChestXray.name,
      "options": {**options, "strict": strict},
      **scan_report,
      "counts": {**{s: outlines.count_labels(splits[s])
                    for s in outlines.SPLIT_NAMES},
                 "all": outlines.count_labels(measured)},
      "mean_ctr": {s: round(float(np.mean([m.ctr for m in splits[s]])), 4)
                   for s in outlines.SPLIT_NAMES},
      "fingerprint": _fingerprint(options, splits),
      "seconds": {"scan": round(time.perf_counter() - start, 3)},
  }
  return splits, report


def prepare_outlines(root: str, out_dir: str, *, size: int = 64, seed: int = 0,
                     test_fraction: float = outlines.TEST_FRACTION,
                     threshold: float = outlines.CTR_THRESHOLD,
                     strict: bool = False, normalize: str = "none") -> str:
  """Builds the TFDS dataset `outlined_chest_xray` from an outlined folder.

  Safe to re-run: a dataset that already holds the same cases (same
  fingerprint) is kept; one that does not is rebuilt.

  Args:
    root: a folder with png/ and mask/heart|left_lung|right_lung/.
    out_dir: where `outlined_chest_xray/<config>/<version>/` and
      `outlines.json` (the report) go.
    size: stored side S (16..1024); images and masks are [S, S, 1].
    seed: seeds the split.
    test_fraction: share of each class that goes to test.
    threshold: label = CTR > threshold.
    strict: fail on the first bad case instead of skipping and counting it.
    normalize: intensity normalisation of the images ("none", "equalize",
      "clahe": images.normalize_image); the masks are not touched.

  Returns:
    The dataset's version directory (holding `dataset_info.json`).

  Raises:
    UserError: bad options, an unusable folder, an out_dir that is not a
      folder; with strict, a bad case (one line naming the file).
  """
  images.check_normalize(normalize)
  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"--out {out_dir}: exists and is not a folder")
  splits, report = prepare_cases(root, size=size, seed=seed,
                                 test_fraction=test_fraction,
                                 threshold=threshold, strict=strict)
  report["options"]["normalize"] = normalize
  cfg = OutlineConfig.make(size=size, seed=seed, test_fraction=test_fraction,
                           threshold=threshold, normalize=normalize)
  version_dir = os.path.join(out_dir, OutlinedChestXray.name, cfg.name,
                             str(OutlinedChestXray.VERSION))
  # Checked before any builder is made, so a re-run is instant.
  rebuilt = not _same_build(version_dir, report["fingerprint"])
  start = time.perf_counter()
  if rebuilt:
    if os.path.isdir(version_dir):
      shutil.rmtree(version_dir)  # Other cases than last time.
    # TFDS refuses a config object named like a registered one (configs
    # compare by identity): pass the registered name instead.
    registered = {c.name for c in OutlinedChestXray.BUILDER_CONFIGS}
    builder = OutlinedChestXray(
        config=cfg.name if cfg.name in registered else cfg, data_dir=out_dir,
        prepared=(splits, report))
    if not progress.interactive():
      tfds.disable_progress_bar()  # TFDS's bars are floods in a log file
    builder.download_and_prepare(file_format="array_record")
    version_dir = os.fspath(builder.data_dir)
  report["seconds"]["tfds"] = round(time.perf_counter() - start, 3)
  report.update(config=cfg.name, tfds_dir=os.path.abspath(version_dir),
                tfds_rebuilt=rebuilt)
  files.write_json(os.path.join(out_dir, REPORT_NAME), report)
  return version_dir


def _same_build(version_dir: str, fingerprint: str) -> bool:
  """Whether a complete build of exactly these cases is already there."""
  # TFDS writes dataset_info.json last: its presence means a complete build.
  if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
    return False
  try:
    with open(os.path.join(version_dir, "metadata.json")) as f:
      return json.load(f).get("fingerprint") == fingerprint
  except (OSError, ValueError):
    return False
