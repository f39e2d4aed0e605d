"""TFDS builder `class_folder_xray`: a class-folder radiograph set as array_record.

Normally built by `prepare_folders`, which scans the root, decodes the images
on every core first (`folders.py`) and hands the builder the decoded pixels.
The builder also works alone, with the default class map:

  builder = ClassFolderXray(config=FolderConfig.make(size=128), data_dir=OUT)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=ROOT))

Records hold the common fields of `records.py` only: image uint8 [S, S, 1],
label int64, id (the image's path relative to the root).

Read it back without this module: `tfds.builder_from_directory(
<OUT>/class_folder_xray/<config>/<version>).as_data_source(split)`.

No TensorFlow: the image is a `Tensor` fed numpy (an `Image` feature fed an
array would call `tf.image.encode_png`), and `DatasetInfo` is built with
`builder=self`.
"""
import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from agcg_jax import files
from agcg_jax import progress
from agcg_jax.data import folders
from agcg_jax.data import records
from agcg_jax.errors import UserError

REPORT_NAME = "cohort.json"


def _metadata(report: Mapping[str, Any]) -> dict[str, Any]:
  """What readers of the dataset may want from the report (metadata.json)."""
  return {"fingerprint": report["fingerprint"],
          "counts": report["counts"]["dataset"],
          "layout": report["layout"],
          "class_folders": report["folders"],
          "normalize": report["options"]["normalize"]}


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """Options of a class-folder dataset; the config name is derived from them.

  `layout` is "class_folders" (split made by seed and test_fraction) or
  "split_folders" (train/ and test/ given).
  """
  size: int = 256
  normalize: str = "none"
  layout: str = "class_folders"
  test_fraction: float = 0.2
  seed: int = 0

  @classmethod
  def make(cls, *, size: int = 256, normalize: str = "none",
           layout: str = "class_folders", test_fraction: float = 0.2,
           seed: int = 0) -> "FolderConfig":
    split = ("given by train/ and test/ folders" if layout == "split_folders"
             else f"{test_fraction:g} of each class to test, seed {seed}")
    return cls(
        name=folders.config_name(size, normalize, layout, test_fraction, seed),
        description=(f"{size}x{size} grayscale, normalize {normalize}, "
                     f"split {split}"),
        size=size, normalize=normalize, layout=layout,
        test_fraction=test_fraction, seed=seed)


class ClassFolderXray(tfds.core.GeneratorBasedBuilder):
  """Chest radiographs from class folders: No Finding vs Cardiomegaly."""

  name = "class_folder_xray"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [FolderConfig.make()]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Point manual_dir at a folder of class folders (<root>/<class>/*.png) or of
  train/ and test/ folders holding class folders. Folder names map to the
  classes by folders.DEFAULT_CLASS_MAP here; `prepare_folders` takes any map.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds this file through `importlib_resources`, a backport
    # it only installs on Python < 3.9, so download_and_prepare fails with
    # ModuleNotFoundError on 3.11+ for any builder outside TFDS itself.
    return epath.Path(__file__)

  def __init__(self, *, prepared: folders.Converted | None = None,
               report: Mapping[str, Any] | None = None, **kwargs):
    """Creates the builder.

    Args:
      prepared: decoded images from `folders.convert_images`; None: the
        builder scans and decodes the manual_dir itself (default class map,
        strict).
      report: the preparation report, for the dataset's metadata.
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (config, data_dir).
    """
    self._prepared = prepared
    self._report = report
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    metadata = tfds.core.MetadataDict()
    if self._report is not None:
      metadata.update(_metadata(self._report))
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Chest radiographs from class folders, labelled by the "
                     "folder they are in (mapped to No Finding or "
                     "Cardiomegaly), grayscale uint8; id is the path "
                     "relative to the root."),
        features=tfds.features.FeaturesDict({
            # Raw bytes: the default encoding writes each pixel as an int64
            # varint (as in tfds_nih.py).
            "image": tfds.features.Tensor(shape=(size, size, 1),
                                          dtype=np.uint8, encoding="bytes"),
            "label": tfds.features.ClassLabel(names=records.CLASS_NAMES),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        metadata=metadata,
    )

  def _split_generators(self, dl_manager):
    if self._prepared is None:
      cfg = self.builder_config
      root = os.fspath(dl_manager.manual_dir)
      scan = folders.scan_folders(root, seed=cfg.seed,
                                  test_fraction=cfg.test_fraction)
      if scan.layout != cfg.layout:
        raise UserError(f"{root} has the layout {scan.layout}, but the "
                        f"config {cfg.name} is for {cfg.layout}")
      work = os.fspath(dl_manager.download_dir)
      os.makedirs(work, exist_ok=True)
      self._prepared = folders.convert_images(
          scan, os.path.join(work, f"{cfg.name}.pixels.npy"), size=cfg.size,
          normalize=cfg.normalize)
    return {s: self._generate_examples(s) for s in folders.SPLIT_NAMES}

  def _generate_examples(self, split: str):
    pixels = np.load(self._prepared.pixels_path, mmap_mode="r")
    for ex in self._prepared.examples[split]:
      yield ex["id"], {"image": np.asarray(pixels[ex["row"]])[:, :, None],
                       "label": ex["label"], "id": ex["id"]}


def prepare_folders(root: str, out_dir: str, *, size: int = 256,
                    seed: int = 0, test_fraction: float = 0.2,
                    class_map: Mapping[Any, Any] | None = None,
                    ignore: Iterable[str] = (), normalize: str = "none",
                    strict: bool = True, workers: int | None = None) -> str:
  """Prepares the TFDS dataset `class_folder_xray` from a class-folder root.

  Safe to re-run: a dataset that already holds the same files (same paths,
  sizes and modification times, same options) is kept without decoding
  anything; otherwise it is rebuilt.

  Args:
    root: `<root>/<class>/*.png`, or `<root>/{train,test}/<class>/*.png`.
    out_dir: where `class_folder_xray/<config>/<version>/` and `cohort.json`
      (the report: options, class folders, counts by split and class, skipped
      files by reason) go.
    size: stored side length S; images are uint8 [S, S, 1].
    seed, test_fraction: the stratified split by image, used only when the
      root has no split folders.
    class_map: {class: [folder names]} (`folders.resolve_class_map`); None:
      `folders.DEFAULT_CLASS_MAP`.
    ignore: folder names to skip.
    normalize: "none", "equalize" or "clahe" (`folders.normalize_image`).
    strict: fail on an unreadable or empty image (a one-line UserError naming
      it); False: skip and count it.
    workers: decoding processes; None: every core.

  Returns:
    The dataset's version directory (holding `dataset_info.json`).
  """
  folders.check_options(size, seed, test_fraction, normalize, workers)
  out_dir = files.output_dir(out_dir)
  start = time.perf_counter()
  scan = folders.scan_folders(root, class_map, ignore=ignore, seed=seed,
                              test_fraction=test_fraction)
  scan_s = time.perf_counter() - start
  config = FolderConfig.make(size=size, normalize=normalize,
                             layout=scan.layout, test_fraction=test_fraction,
                             seed=seed)
  version_dir = os.path.join(out_dir, ClassFolderXray.name, config.name,
                             str(ClassFolderXray.VERSION))
  fingerprint = folders.fingerprint(scan, size=size, normalize=normalize)
  try:
    with open(os.path.join(version_dir, "metadata.json")) as f:
      same = json.load(f).get("fingerprint") == fingerprint
  except (OSError, ValueError):
    same = False
  if same and os.path.exists(os.path.join(version_dir, "dataset_info.json")):
    return version_dir
  if os.path.isdir(version_dir):
    shutil.rmtree(version_dir)  # Other files than last time.

  # A private name: another run into the same out_dir has its own.
  fd, pixels_path = tempfile.mkstemp(prefix=f".{config.name}.",
                                     suffix=".pixels.npy", dir=out_dir)
  os.close(fd)
  try:
    converted = folders.convert_images(scan, pixels_path, size=size,
                                       normalize=normalize, strict=strict,
                                       workers=workers)
    resolved = folders.resolve_class_map(class_map, ignore)
    report = {
        "dataset": ClassFolderXray.name,
        "options": {"root": os.path.abspath(scan.root), "size": size,
                    "seed": seed, "test_fraction": test_fraction,
                    "class_map": {c: sorted(n for n, l in resolved.items()
                                            if l == i)
                                  for i, c in enumerate(records.CLASS_NAMES)},
                    "ignore": sorted(str(n) for n in ignore),
                    "normalize": normalize, "strict": strict,
                    "workers": converted.report.pop("workers")},
        "layout": scan.layout,
        "split": ("given by the train/ and test/ folders"
                  if scan.layout == "split_folders" else
                  "by image, stratified by class, seeded (no patient ids: "
                  "a patient's images may be on both sides)"),
        "folders": scan.folders,
        "ignored_folders": scan.ignored,
        "other_files": scan.other_files,
        **converted.report,
        "fingerprint": fingerprint,
        "config": config.name,
    }
    report["seconds"]["scan"] = round(scan_s, 3)
    registered = {c.name for c in ClassFolderXray.BUILDER_CONFIGS}
    builder = ClassFolderXray(
        config=config.name if config.name in registered else config,
        data_dir=out_dir, prepared=converted, report=report)
    start = time.perf_counter()
    if not progress.interactive():
      tfds.disable_progress_bar()  # TFDS's bars flood a log file
    builder.download_and_prepare(
        download_dir=os.path.join(out_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=scan.root))
    report["seconds"]["tfds"] = round(time.perf_counter() - start, 3)
  finally:
    if os.path.exists(pixels_path):
      os.remove(pixels_path)
  report["tfds_dir"] = os.path.abspath(builder.data_dir)
  files.write_json(os.path.join(out_dir, REPORT_NAME), report)
  return os.fspath(builder.data_dir)
