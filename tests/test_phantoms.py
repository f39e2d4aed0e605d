"""Tests of the phantom generator: determinism, ground truth, label leakage."""
import numpy as np
import pytest

from agcg_jax.data import phantoms

_KEYS = ("image", "heart_mask", "body_mask", "ctr", "heart_box", "thorax_box", "label")


def _batch(n, size, start=0):
  """n phantoms with alternating labels, seeds start..start+n-1."""
  return [phantoms.make_phantom(start + i, size, i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def many():
  # One shared set keeps the file fast: 300 phantoms at 32x32 take ~1.5 s.
  return _batch(300, 32, start=1000)


def _auc(score, label):
  """Area under the ROC curve of `score` for label 1 (ties ignored)."""
  ranks = np.argsort(np.argsort(score))
  n1 = label.sum()
  n0 = len(label) - n1
  return (ranks[label == 1].sum() - n1 * (n1 - 1) / 2) / (n0 * n1)


def test_same_seed_same_phantom():
  a = phantoms.make_phantom(7, 64, 1)
  b = phantoms.make_phantom(7, 64, 1)
  for key in _KEYS:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_different_seeds_differ():
  a = phantoms.make_phantom(1, 64, 0)
  b = phantoms.make_phantom(2, 64, 0)
  assert np.abs(a["image"].astype(int) - b["image"].astype(int)).mean() > 2
  assert a["ctr"] != b["ctr"]


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_dtypes_ranges(size):
  for label in (0, 1):
    p = phantoms.make_phantom(3, size, label)
    assert p["image"].shape == (size, size, 1) and p["image"].dtype == np.uint8
    assert p["heart_mask"].shape == (size, size, 1)
    assert p["heart_mask"].dtype == np.uint8
    assert set(np.unique(p["heart_mask"])) == {0, 1}
    assert p["ctr"].dtype == np.float32 and p["ctr"].shape == ()
    for box in ("heart_box", "thorax_box"):
      assert p[box].dtype == np.float32 and p[box].shape == (4,)
      x0, y0, x1, y1 = p[box]
      assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, (box, p[box])
    assert p["label"] == label
    # A radiograph, not a flat or saturated field.
    assert p["image"].std() > 20
    assert 10 < p["image"].mean() < 245


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sizes_scale_consistently(size):
  p = phantoms.make_phantom(11, size, 1)
  q = phantoms.make_phantom(11, 64, 1)
  # Same patient at another resolution: boxes scale with the size and the
  # CTR stays (up to pixel rounding).
  np.testing.assert_allclose(p["heart_box"] / size, q["heart_box"] / 64,
                             atol=1.5 / size)
  assert abs(p["ctr"] - q["ctr"]) < 0.03


def test_label_follows_measured_ctr(many):
  ctr = np.array([p["ctr"] for p in many])
  label = np.array([p["label"] for p in many])
  assert np.all((ctr > phantoms.CTR_THRESHOLD) == (label == 1)), (
      ctr[label == 0].max(), ctr[label == 1].min())
  # Both classes spread over their range, not one value each.
  assert ctr[label == 0].std() > 0.02 and ctr[label == 1].std() > 0.02


def test_ctr_is_about_box_width_ratio(many):
  # The CTR is measured across the patient; the image-axis boxes see the
  # same widths up to the pose's rotation (<= 5 degrees).
  for p in many:
    hb, tb = p["heart_box"], p["thorax_box"]
    assert abs(p["ctr"] - (hb[2] - hb[0]) / (tb[2] - tb[0])) < 0.05


def test_ctr_without_rotation_is_box_width_ratio(monkeypatch):
  real_pose = phantoms._Pose
  monkeypatch.setattr(phantoms, "_Pose",
                      lambda shift, rot, scale, res: real_pose(
                          shift, 0.0, scale, res))
  for seed in range(10):
    p = phantoms.make_phantom(seed, 64, seed % 2)
    hb, tb = p["heart_box"], p["thorax_box"]
    assert p["ctr"] == pytest.approx((hb[2] - hb[0]) / (tb[2] - tb[0]),
                                     rel=1e-3)


def test_heart_box_matches_mask_and_lies_in_thorax(many):
  for p in many:
    mask = p["heart_mask"][..., 0].astype(bool)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    extent = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    # The box comes from the supersampled mask; the stored mask keeps pixels
    # at least half covered, so they agree to within a pixel.
    np.testing.assert_allclose(p["heart_box"], extent, atol=1.0)
    tb = p["thorax_box"]
    assert (cols[0] >= tb[0] - 0.5 and cols[-1] + 1 <= tb[2] + 0.5
            and rows[0] >= tb[1] - 0.5 and rows[-1] + 1 <= tb[3] + 0.5), (
                p["heart_box"], tb)


def test_heart_is_bright_and_lungs_dark(many):
  # The heart sits over the medial lungs: its mask is brighter than the
  # thorax box around it on average (lungs are dark).
  diffs = []
  for p in many[:100]:
    img = p["image"][..., 0].astype(float)
    mask = p["heart_mask"][..., 0].astype(bool)
    x0, y0, x1, y1 = np.round(p["thorax_box"]).astype(int)
    thorax = np.zeros_like(mask)
    thorax[y0:y1, x0:x1] = True
    diffs.append(img[mask].mean() - img[thorax & ~mask].mean())
  assert np.mean(diffs) > 20 and np.mean(np.array(diffs) > 0) > 0.95


def test_global_brightness_does_not_give_the_label_away(many):
  label = np.array([p["label"] for p in many])
  mean = np.array([p["image"].mean() for p in many])
  std = np.array([p["image"].std() for p in many])
  # A bigger heart covers more dark lung, so a slight shift is physical;
  # exposure, gamma, offset and contrast must swamp it.
  assert 0.3 < _auc(mean, label) < 0.7
  assert 0.3 < _auc(std, label) < 0.7


def test_other_label_changes_only_the_heart():
  # The label's one draw only moves the CTR: same seed, other label is the
  # same patient, pose, exposure, noise and devices with another heart.
  for seed in range(5):
    a = phantoms.make_phantom(seed, 64, 0)
    b = phantoms.make_phantom(seed, 64, 1)
    assert a["ctr"] < 0.5 < b["ctr"]
    np.testing.assert_array_equal(a["thorax_box"], b["thorax_box"])
    # Outside both hearts' boxes (plus the blur's reach) nothing changes.
    x0 = int(min(a["heart_box"][0], b["heart_box"][0])) - 4
    y0 = int(min(a["heart_box"][1], b["heart_box"][1])) - 4
    x1 = int(np.ceil(max(a["heart_box"][2], b["heart_box"][2]))) + 4
    y1 = int(np.ceil(max(a["heart_box"][3], b["heart_box"][3]))) + 4
    outside = np.ones((64, 64), bool)
    outside[max(0, y0):y1, max(0, x0):x1] = False
    np.testing.assert_array_equal(a["image"][..., 0][outside],
                                  b["image"][..., 0][outside])
    assert not np.array_equal(a["image"], b["image"])


def test_phantom_seed_is_pure_and_distinct():
  assert phantoms.phantom_seed(0, "train", 5) == phantoms.phantom_seed(
      0, "train", 5)
  seeds = {phantoms.phantom_seed(s, split, i) for s in (0, 1)
           for split in ("train", "test") for i in range(100)}
  assert len(seeds) == 400


def test_bad_arguments():
  with pytest.raises(ValueError, match="label"):
    phantoms.make_phantom(0, 64, 2)
  with pytest.raises(ValueError, match="size"):
    phantoms.make_phantom(0, 8, 0)


def test_counterfactual_twins_differ_only_around_the_heart():
  """The truth the explanation is scored against: a seed's two labels differ
  only where either heart is (plus the antialiased edge), and share the body."""
  from scipy import ndimage
  for seed in range(6):
    a, b = phantoms.make_phantom(seed, 64, 0), phantoms.make_phantom(seed, 64, 1)
    np.testing.assert_array_equal(a["body_mask"], b["body_mask"])
    diff = np.abs(a["image"].astype(int) - b["image"].astype(int))[..., 0] > 8
    hearts = (a["heart_mask"] | b["heart_mask"])[..., 0].astype(bool)
    near = ndimage.binary_dilation(hearts, iterations=2)
    assert diff.any() and not (diff & ~near).any(), seed
    assert a["ctr"] < 0.5 < b["ctr"]
    body = a["body_mask"][..., 0].astype(bool)
    assert body[hearts].all() and 0.4 < body.mean() < 1.0 and not body[0, 0] and not body[0, -1]
