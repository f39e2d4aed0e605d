"""Tests of the confounder audit: features outside the heart, folds, CV accuracy."""
import numpy as np
import pytest

from agcg_jax import audit
from agcg_jax.data import phantoms

BOX = (0.3, 0.35, 0.7, 0.75)


# --- cross-validated accuracy ------------------------------------------------


def test_features_that_carry_the_label_give_accuracy_near_one():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 300)
  x = np.column_stack([rng.normal(size=(300, 5)),
                       y + 0.2 * rng.normal(size=300)])
  result = audit.cv_accuracy(x, y, folds=5, seed=0)
  assert result.accuracy >= 0.97
  assert len(result.fold_accuracies) == 5


@pytest.mark.parametrize("positive_share", [0.5, 0.25])
def test_noise_features_give_the_majority_baseline(positive_share):
  rng = np.random.default_rng(1)
  n = 400
  y = (rng.random(n) < positive_share).astype(int)
  x = rng.normal(size=(n, 9))
  result = audit.cv_accuracy(x, y, folds=5, seed=0)
  assert result.majority_baseline == pytest.approx(
      max(y.mean(), 1 - y.mean()), abs=0.01)
  # The CV accuracy's standard error is ~0.025 at n = 400.
  assert abs(result.accuracy - result.majority_baseline) <= 0.07


def test_folds_are_stratified_and_seeded():
  y = np.array([0] * 53 + [1] * 21)
  folds = audit.stratified_folds(y, 5, seed=3)
  assert set(folds) == set(range(5))
  for c, n in ((0, 53), (1, 21)):
    per_fold = np.bincount(folds[y == c], minlength=5)
    assert per_fold.min() >= n // 5 and per_fold.max() <= -(-n // 5)
  sizes = np.bincount(folds, minlength=5)
  assert sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(folds, audit.stratified_folds(y, 5, seed=3))
  assert not np.array_equal(folds, audit.stratified_folds(y, 5, seed=4))


def test_cv_accuracy_is_deterministic():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 2, 120)
  x = rng.normal(size=(120, 4)) + 0.5 * y[:, None]
  assert audit.cv_accuracy(x, y, seed=7) == audit.cv_accuracy(x, y, seed=7)


def test_cv_accuracy_refuses_bad_input():
  y = np.array([0] * 10 + [1] * 3)
  with pytest.raises(ValueError, match="at least 5 samples of each class"):
    audit.cv_accuracy(np.zeros((13, 2)), y)
  with pytest.raises(ValueError, match="non-finite"):
    audit.cv_accuracy(np.full((13, 2), np.nan), y, folds=3)


def test_logistic_fit_matches_the_obvious_rule():
  x = np.linspace(-3, 3, 61)[:, None]
  y = (x[:, 0] > 0.5).astype(int)
  model = audit.fit_logistic(x, y)
  assert (audit.predict_logistic(model, x) == y).mean() >= 0.98


# --- image statistics outside the heart -------------------------------------


def test_pixels_inside_the_widened_box_do_not_matter():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 64, 64), dtype=np.uint8)
  inside = ~audit.outside_mask(64, BOX, widen=1.25)
  assert inside.any() and not inside.all()
  changed = images.copy()
  changed[:, inside] = 255 - changed[:, inside]
  np.testing.assert_array_equal(
      audit.outside_heart_features(images, BOX, 1.25),
      audit.outside_heart_features(changed, BOX, 1.25))
  changed[:, ~inside] //= 2
  assert not np.array_equal(
      audit.outside_heart_features(images, BOX, 1.25),
      audit.outside_heart_features(changed, BOX, 1.25))


def test_box_widening():
  mask = audit.outside_mask(100, (0.4, 0.4, 0.6, 0.6), widen=1.0)
  assert (~mask).sum() == 20 * 20
  mask = audit.outside_mask(100, (0.4, 0.4, 0.6, 0.6), widen=1.5)
  assert (~mask).sum() == 30 * 30
  # About the centre (0.25, 0.5): x in [-0.25, 0.75], clipped to [0, 0.75].
  mask = audit.outside_mask(100, (0.0, 0.0, 0.5, 1.0), widen=2.0)
  assert (~mask).sum() == 75 * 100
  with pytest.raises(ValueError, match="fractions of the side"):
    audit.outside_mask(64, (0.5, 0.2, 0.4, 0.6))


def test_body_extent_and_collimation_on_drawn_images():
  image = np.zeros((64, 64), np.uint8)
  image[4:60, 10:50] = 180        # a body 40 wide and 56 tall on black
  image[20:40, 25:35] = 60        # a dark lung inside: still in the extent
  image[:, 0:3] = 250             # bright columns at the left edge...
  image[0:2, :] = 0               # ...and black rows at the top
  f = dict(zip(audit.FEATURE_NAMES,
               audit.outside_heart_features(image[None], (0.45, 0.45, 0.55,
                                                          0.55), 1.0)[0]))
  assert f["body_width"] == pytest.approx((50 - 0) / 64)
  assert f["body_height"] == pytest.approx(56 / 64)
  # Rows 0-3 and 60-63 hold only the 3 bright edge columns: mean 11.7 < 20.
  assert f["collimation_rows"] == pytest.approx(8 / 64)
  assert f["collimation_cols"] == pytest.approx((64 - 50) / 64)
  assert f["p05"] == 0 and f["p95"] == 180


def test_label_in_exposure_is_found_label_in_heart_is_not():
  rng = np.random.default_rng(5)
  n = 200
  y = np.arange(n) % 2
  base = rng.normal(120, 25, (n, 1, 1)) + rng.normal(0, 10, (n, 48, 48))
  inside = ~audit.outside_mask(48, BOX, 1.25)
  heart = base.copy()
  heart[:, inside] += 60 * y[:, None]              # only the heart differs
  exposure = base + 80 * y[:, None, None]          # the whole film differs
  as_u8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)
  result = audit.audit(as_u8(heart), y, box_xyxy_fraction=BOX)
  assert abs(result["audit_outside_heart_accuracy"]
             - result["audit_majority_baseline"]) <= 0.1
  result = audit.audit(as_u8(exposure), y, box_xyxy_fraction=BOX)
  # The best rule on the mean grey level gets Phi(40 / 25) = 0.95.
  assert result["audit_outside_heart_accuracy"] >= 0.85


# --- phantoms: what the generator randomises comes out near chance ----------


@pytest.fixture(scope="module")
def phantom_pairs():
  """200 training phantoms at 64 px and their counterfactual twins."""
  size, n = 64, 200
  seeds = [phantoms.phantom_seed(0, "train", i) for i in range(n)]
  labels = np.arange(n) % 2
  real = [phantoms.make_phantom(s, size, l) for s, l in zip(seeds, labels)]
  twins = [phantoms.make_phantom(s, size, 1 - l) for s, l in zip(seeds, labels)]
  box = np.mean([r["heart_box"] for r in real], 0) / size
  return (np.stack([r["image"][..., 0] for r in real]),
          np.stack([t["image"][..., 0] for t in twins]), labels, box)


def test_phantom_twins_look_alike_outside_the_widened_heart_box(phantom_pairs):
  images, twins, _, box = phantom_pairs
  f = audit.outside_heart_features(images, box, audit.DEFAULT_WIDEN)
  g = audit.outside_heart_features(twins, box, audit.DEFAULT_WIDEN)
  spread = np.maximum(f.std(0), 1e-9)
  # Measured (200 phantoms, 64 px): at most 0.1 of a feature's spread with
  # the box widened 1.25x, up to 0.25 with the bare mean box.
  assert (np.abs(f - g).mean(0) / spread).max() <= 0.15


def test_phantom_audit_is_near_chance(phantom_pairs):
  images, _, labels, box = phantom_pairs
  result = audit.audit(images, labels, box_xyxy_fraction=box, seed=0)
  assert set(result) == {"audit_nonimage_accuracy",
                         "audit_outside_heart_accuracy",
                         "audit_majority_baseline", "audit_folds"}
  assert result["audit_nonimage_accuracy"] is None
  assert result["audit_folds"] == 5
  assert result["audit_majority_baseline"] == pytest.approx(0.5)
  # Measured 0.49; the CV accuracy's standard error is ~0.035 at n = 200.
  assert abs(result["audit_outside_heart_accuracy"] - 0.5) <= 0.1
  assert result == audit.audit(images, labels, box_xyxy_fraction=box, seed=0)


# --- non-image fields --------------------------------------------------------


def test_nonimage_fields():
  assert audit.nonimage_features(None) is None
  assert audit.nonimage_features({}) is None
  x = audit.nonimage_features({"view": ["PA", "AP", "PA"], "age": [30, 60, 45]})
  np.testing.assert_array_equal(x, [[30, 0, 1], [60, 1, 0], [45, 0, 1]])
  with pytest.raises(ValueError, match="has 2 values"):
    audit.nonimage_features({"a": [1, 2, 3], "b": ["x", "y"]})


def test_audit_with_fields_that_carry_the_label():
  rng = np.random.default_rng(3)
  n = 100
  y = np.arange(n) % 2
  images = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8)
  fields = {"view": np.where(y == 1, "AP", "PA"),
            "sex": rng.choice(["M", "F"], n)}
  result = audit.audit(images, y, box_xyxy_fraction=BOX, fields=fields)
  assert result["audit_nonimage_accuracy"] == 1.0
  assert abs(result["audit_outside_heart_accuracy"] - 0.5) <= 0.15


def test_audit_with_too_few_images_of_a_class():
  images = np.zeros((5, 16, 16), np.uint8)
  result = audit.audit(images, np.array([0, 0, 0, 0, 1]), box_xyxy_fraction=BOX)
  assert result["audit_outside_heart_accuracy"] is None
  result = audit.audit(images, np.array([0, 0, 0, 1, 1]), box_xyxy_fraction=BOX)
  assert result["audit_folds"] == 2
  assert result["audit_outside_heart_accuracy"] is not None
