"""The example cases a run's figures show: one schema for evaluate, explain, report and tests.

`ExampleMaps` holds N cases, one row each: the image, the translation into
the other class with its attention and generator output, the classifier's
decision map, and whatever ground truth the dataset has. Saved as a plain
.npz (numbers and unicode strings only; loaded with allow_pickle=False).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from agcg_jax import files
from agcg_jax.data.records import DIRECTIONS


_MAPS = ("real", "attention", "generated", "fake", "cam")
_OPTIONAL_MAPS = ("heart_mask", "twin")
_ROWS = ("id", "direction", "label", "pred", "pred_translated", "prob", "ctr_real", "ctr_fake")


@dataclasses.dataclass
class ExampleMaps:
  """N example cases (all maps [N, S, S] float32, images in [-1, 1]).

  id: str [N]; direction: str [N], the direction `fake` was translated in
  (one of DIRECTIONS); label: int32 [N], the true class of `real` (-1 if
  unknown, as for `agcg explain`); pred, pred_translated: int32 [N]
  (pred_translated is the classifier on `fake`); prob: float32 [N], probability of `pred`;
  cam: the decision map of kind `cam_kind` ("margin" or "equ9", cam.py),
  upsampled onto the image; ctr_real / ctr_fake: float32 [N], the CTR of the image and
  its translation by the phantoms' CTR regressor or the outlined sets'
  segmenter (NaN where not measured); heart_mask, twin: [N, S, S] or None where the dataset has no
  such truth (twin = the phantom rendered with the other label).
  """
  id: np.ndarray
  direction: np.ndarray
  label: np.ndarray
  pred: np.ndarray
  pred_translated: np.ndarray
  prob: np.ndarray
  real: np.ndarray
  attention: np.ndarray
  generated: np.ndarray
  fake: np.ndarray
  cam: np.ndarray
  ctr_real: np.ndarray
  ctr_fake: np.ndarray
  cam_kind: str = "margin"
  heart_mask: np.ndarray | None = None
  twin: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.id)
    self.id = np.asarray(self.id, dtype=str).reshape(n)
    self.direction = np.asarray(self.direction, dtype=str).reshape(n)
    bad = sorted(set(self.direction.tolist()) - set(DIRECTIONS))
    if bad:
      raise ValueError(f"ExampleMaps.direction: unknown {bad}; expected {DIRECTIONS}")
    for k in ("label", "pred", "pred_translated"):
      setattr(self, k, np.asarray(getattr(self, k), np.int32).reshape(n))
    for k in ("prob", "ctr_real", "ctr_fake"):
      setattr(self, k, np.asarray(getattr(self, k), np.float32).reshape(n))
    for k in _MAPS + _OPTIONAL_MAPS:
      v = getattr(self, k)
      if v is None:
        continue
      v = np.asarray(v, np.float32)
      if v.ndim != 3 or v.shape[0] != n:
        raise ValueError(f"ExampleMaps.{k}: expected [{n}, S, S], got {v.shape}")
      setattr(self, k, v)

  def __len__(self) -> int:
    return len(self.id)

  @property
  def size(self) -> int:
    return int(self.real.shape[-1])

  def where(self, *, direction: str | None = None, label: int | None = None,
            pred: int | None = None) -> np.ndarray:
    """Indices of the cases matching every given condition."""
    keep = np.ones(len(self), bool)
    if direction is not None:
      keep &= self.direction == direction
    if label is not None:
      keep &= self.label == label
    if pred is not None:
      keep &= self.pred == pred
    return np.flatnonzero(keep)

  def take(self, index) -> "ExampleMaps":
    """The cases at `index` (an index array), as a new ExampleMaps."""
    index = np.asarray(index, np.int64)
    fields = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      fields[f.name] = v if (v is None or isinstance(v, str)) else v[index]
    return ExampleMaps(**fields)

  @classmethod
  def empty(cls, size: int, *, cam_kind: str = "margin") -> "ExampleMaps":
    z = np.zeros((0, size, size), np.float32)
    return cls(id=np.zeros(0, str), direction=np.zeros(0, str), label=[], pred=[], pred_translated=[], prob=[],
               real=z, attention=z, generated=z, fake=z, cam=z, ctr_real=[], ctr_fake=[],
               cam_kind=cam_kind)

  @classmethod
  def concatenate(cls, parts: list["ExampleMaps"]) -> "ExampleMaps":
    """Cases of several sets in order (their optional maps must agree in presence)."""
    if not parts:
      raise ValueError("nothing to concatenate")
    fields = {}
    for f in dataclasses.fields(cls):
      values = [getattr(p, f.name) for p in parts]
      if f.name == "cam_kind":
        fields[f.name] = values[0]
      elif any(v is None for v in values):
        fields[f.name] = None
      else:
        fields[f.name] = np.concatenate(values)
    return cls(**fields)

  def save(self, path: str | os.PathLike) -> None:
    """Writes an .npz atomically (a temporary file, then a rename)."""
    arrays = {k: getattr(self, k) for k in _ROWS + _MAPS}
    for k in _OPTIONAL_MAPS:
      if getattr(self, k) is not None:
        arrays[k] = getattr(self, k)
    arrays["cam_kind"] = np.asarray(self.cam_kind)
    with files.atomic_path(path, suffix=".npz") as tmp:
      np.savez(tmp, **arrays)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "ExampleMaps":
    """Reads what `save` wrote; a missing field is a ValueError naming the file."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
      missing = [k for k in _ROWS + _MAPS + ("cam_kind",) if k not in z.files]
      if missing:
        raise ValueError(f"{os.fspath(path)}: not an examples file (missing {', '.join(missing)})")
      fields = {k: z[k] for k in _ROWS + _MAPS}
      for k in _OPTIONAL_MAPS:
        fields[k] = z[k] if k in z.files else None
      fields["cam_kind"] = str(z["cam_kind"])
    return cls(**fields)
