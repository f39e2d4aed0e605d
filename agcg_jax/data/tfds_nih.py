"""TFDS builder `nih_chest_xray14`: the NIH cohort as array_record files.

Normally built by `prepare_nih` below (`agcg prepare`), which converts the
images on every core first and hands the builder the prepared examples. The
builder also works alone, e.g.

  builder = NihChestXray14(config=NihConfig.make(size=256), data_dir=OUT)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=NIH_DIR))

and then caches converted images under `OUT/downloads/nih_cache/`.

Read it back without this module: `tfds.builder_from_directory(
<OUT>/nih_chest_xray14/<config>/<version>).as_data_source(split)`.

No TensorFlow: features are `Tensor`s fed numpy arrays (an `Image` feature
fed an array would call `tf.image.encode_png`), and `DatasetInfo` is built
with `builder=self`.
"""
import dataclasses
import json
import os
import shutil
import time
from typing import Any

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from agcg_jax import files
from agcg_jax import progress
from agcg_jax.data import images
from agcg_jax.data import nih
from agcg_jax.data import nih_prepare
from agcg_jax.data import records

_CITATION = """\
@inproceedings{wang2017chestxray8,
  title={ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on
         Weakly-Supervised Classification and Localization of Common Thorax
         Diseases},
  author={Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and
          Bagheri, Mohammadhadi and Summers, Ronald M.},
  booktitle={CVPR},
  year={2017}
}"""


def _metadata(report: dict[str, Any]) -> dict[str, Any]:
  """What readers of the dataset may want from cohort.json (metadata.json)."""
  return {"fingerprint": report["fingerprint"],
          "class_weights": report["class_weights"],
          "counts": report["counts"],
          "box_findings": list(nih.BOX_FINDINGS)}


@dataclasses.dataclass(eq=False)
class NihConfig(tfds.core.BuilderConfig):
  """Options of the cohort; the config name is derived from them."""
  size: int = 256
  views: str = "both"
  split: str = "patient"
  balance: str = "undersample"
  seed: int = 0
  normalize: str = "none"
  controls: str = ""

  @classmethod
  def make(cls, *, size: int = 256, views: str = "both",
           split: str = "patient", balance: str = "undersample",
           seed: int = 0, normalize: str = "none", controls: str = "") -> "NihConfig":
    return cls(
        name=nih.config_name(size, views, split, balance, seed, normalize, controls),
        description=(f"{size}x{size} grayscale, views {views}, split {split}, "
                     f"train balance {balance}, seed {seed}, intensity {normalize}"),
        size=size, views=views, split=split, balance=balance, seed=seed,
        normalize=normalize, controls=",".join(nih.parse_controls(controls)))


class NihChestXray14(tfds.core.GeneratorBasedBuilder):
  """NIH ChestX-ray14: Cardiomegaly vs No Finding, with expert boxes."""

  name = "nih_chest_xray14"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Patient sex (for the confounder audit and cohort controls)."}
  BUILDER_CONFIGS = [NihConfig.make()]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download NIH ChestX-ray14 (https://nihcc.app.box.com/v/ChestXray-NIHCC, or
  Kaggle's "nih-chest-xrays/data") and point manual_dir at the folder that
  holds Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), BBox_List_2017.csv,
  train_val_list.txt, test_list.txt, and the PNGs in images/ (NIH layout) or
  images_001/images/ ... images_012/images/ (Kaggle layout). A partial
  download works: absent images are counted and skipped.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds this file through `importlib_resources`, a backport
    # it only installs on Python < 3.9, so download_and_prepare fails with
    # ModuleNotFoundError on 3.11+ for any builder outside TFDS itself.
    return epath.Path(__file__)

  def __init__(self, *,
               prepared: tuple[nih_prepare.Examples, dict[str, Any]] | None = None,
               **kwargs):
    """Creates the builder.

    Args:
      prepared: (examples, report) from `nih_prepare.prepare_examples`; None: the
        builder prepares them itself from the manual_dir (the NIH folder).
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (config, data_dir).
    """
    self._prepared = prepared
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    metadata = tfds.core.MetadataDict()
    if self._prepared is not None:
      metadata.update(_metadata(self._prepared[1]))
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Chest radiographs of NIH ChestX-ray14 labelled "
                     "Cardiomegaly or exactly No Finding, grayscale uint8, "
                     "with the expert boxes (x0, y0, x1, y1) in stored "
                     "pixels; box_labels index " + ", ".join(nih.BOX_FINDINGS)),
        features=tfds.features.FeaturesDict({
            # Raw bytes: the default encoding writes each pixel as an int64
            # varint (~100 KB an image at 256 px, 5 ms to serialize).
            "image": tfds.features.Tensor(shape=(size, size, 1),
                                          dtype=np.uint8, encoding="bytes"),
            "label": tfds.features.ClassLabel(names=records.CLASS_NAMES),
            "id": tfds.features.Text(),
            "patient": tfds.features.Tensor(shape=(), dtype=np.int64),
            "view": tfds.features.Text(),
            "age": tfds.features.Tensor(shape=(), dtype=np.int32),
            "sex": tfds.features.Text(),
            "boxes": tfds.features.Tensor(shape=(nih.MAX_BOXES, 4),
                                          dtype=np.float32),
            "box_labels": tfds.features.Tensor(shape=(nih.MAX_BOXES,),
                                               dtype=np.int32),
            "num_boxes": tfds.features.Tensor(shape=(), dtype=np.int32),
            "cardiomegaly_box": tfds.features.Tensor(shape=(4,),
                                                     dtype=np.float32),
            "has_cardiomegaly_box": tfds.features.Tensor(shape=(),
                                                         dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
        citation=_CITATION,
        metadata=metadata,
    )

  def _split_generators(self, dl_manager):
    if self._prepared is None:
      cfg = self.builder_config
      self._prepared = nih_prepare.prepare_examples(
          os.fspath(dl_manager.manual_dir),
          os.path.join(os.fspath(dl_manager.download_dir), "nih_cache",
                       f"size{cfg.size}"),
          size=cfg.size, views=cfg.views, split=cfg.split,
          balance=cfg.balance, seed=cfg.seed, controls=cfg.controls)
      self.info.metadata.update(_metadata(self._prepared[1]))
    examples = self._prepared[0]
    return {s: self._generate_examples(examples[s]) for s in nih.SPLIT_NAMES}

  def _generate_examples(self, examples):
    size = self.builder_config.size
    for ex in examples:
      with Image.open(ex["cache"]) as im:
        # The cache holds the converted image; normalisation is this config's.
        image = images.normalize_image(np.asarray(im, dtype=np.uint8),
                                       self.builder_config.normalize)
      if image.shape != (size, size):
        raise ValueError(f"{ex['cache']}: {image.shape}, expected "
                         f"{(size, size)}")
      boxes = np.zeros((nih.MAX_BOXES, 4), np.float32)
      box_labels = np.full((nih.MAX_BOXES,), -1, np.int32)
      n = len(ex["boxes"])
      if n:
        boxes[:n] = ex["boxes"]
        box_labels[:n] = ex["box_labels"]
      cardio = ex["cardiomegaly_box"]
      yield ex["id"], {
          "image": image[:, :, None],
          "label": ex["label"],
          "id": ex["id"],
          "patient": np.int64(ex["patient"]),
          "view": ex["view"],
          "age": np.int32(ex["age"]),
          "sex": ex.get("sex", ""),
          "boxes": boxes,
          "box_labels": box_labels,
          "num_boxes": np.int32(n),
          "cardiomegaly_box": np.asarray(cardio or [0.0] * 4, np.float32),
          "has_cardiomegaly_box": np.int32(cardio is not None),
      }


def prepare_nih(data_dir: str, out_dir: str, *, size: int = 256,
                views: str = "both", split: str = "patient",
                balance: str = "undersample", seed: int = 0,
                strict: bool = False, workers: int | None = None,
                normalize: str = "none", controls: str = "") -> dict[str, Any]:
  """Prepares the TFDS dataset `nih_chest_xray14` from an NIH download.

  Safe to re-run: converted images are reused from `<out_dir>/cache/`, and a
  TFDS dataset that already holds the same examples is kept; one that does
  not (more images downloaded since) is rebuilt.

  Args:
    data_dir: the NIH release (NIH or Kaggle layout), possibly partial.
    out_dir: where `cache/`, `nih_chest_xray14/<config>/<version>/` and
      `cohort.json` go.
    size: stored side length S; images are uint8 [S, S, 1].
    views: "both", "PA" or "AP".
    split: "patient" (patient-disjoint 80/20), "paper" (80/20 by image, the
      paper's Table 1) or "official" (NIH's lists).
    balance: "undersample" (the larger class of the training split cut to the
      smaller's count, the paper's adjusted set) or "none" (class weights in
      the report); the test split is always whole.
    seed: seeds the split and the undersampling.
    strict: fail on a missing or unreadable image instead of skipping it.
    workers: conversion processes; None: every core.
    normalize: intensity normalisation applied when the records are written
      ("none", "equalize", "clahe": images.normalize_image); the cache keeps
      the converted images, so options share it.
    controls: cohort controls, comma-separated (nih.CONTROL_OPTIONS:
      one_per_patient, match_age_sex), applied before the split.

  Returns:
    The report also written to `<out_dir>/cohort.json`, with `tfds_dir`, the
    folder for `tfds.builder_from_directory`.
  """
  images.check_normalize(normalize)
  out_dir = files.output_dir(out_dir)
  cache_dir = os.path.join(out_dir, "cache", f"size{size}")
  examples, report = nih_prepare.prepare_examples(
      data_dir, cache_dir, size=size, views=views, split=split,
      balance=balance, seed=seed, strict=strict, workers=workers, controls=controls)
  report["options"]["normalize"] = normalize
  config = NihConfig.make(size=size, views=views, split=split,
                          balance=balance, seed=seed, normalize=normalize, controls=controls)
  # TFDS refuses a config object named like a registered one: pass the name then.
  registered = {c.name for c in NihChestXray14.BUILDER_CONFIGS}
  builder = NihChestXray14(
      config=config.name if config.name in registered else config, data_dir=out_dir,
      prepared=(examples, report))
  version_dir = os.fspath(builder.data_dir)
  metadata_file = os.path.join(version_dir, "metadata.json")
  rebuilt = True
  if os.path.isdir(version_dir):
    try:
      with open(metadata_file) as f:
        same = json.load(f).get("fingerprint") == report["fingerprint"]
    except (OSError, ValueError):
      same = False
    if same:
      rebuilt = False
    else:
      # Other images than last time (a download grew, or files changed).
      shutil.rmtree(version_dir)
  start = time.perf_counter()
  if not progress.interactive():
    tfds.disable_progress_bar()  # TFDS's bars are carriage-return floods in a log file
  builder.download_and_prepare(
      download_dir=os.path.join(out_dir, "downloads"),
      download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
  report["seconds"]["tfds"] = round(time.perf_counter() - start, 3)
  report["config"] = config.name
  report["tfds_dir"] = os.path.abspath(version_dir)
  report["tfds_rebuilt"] = rebuilt
  files.write_json(os.path.join(out_dir, "cohort.json"), report)
  return report
