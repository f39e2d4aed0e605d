"""Tests of the heart/lung segmenter, its loss, step and the CTR of its masks."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agcg_jax import segment
from agcg_jax.data import pipeline
from agcg_jax.data import tfds_outlines
from agcg_jax.models.layers import depth_to_space
from agcg_jax.models.segmenter import Segmenter, space_to_depth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "outlines")
S = 64


def _maps(heart_cols, lung_cols, *, size=S, heart_rows=(30, 45),
          lung_rows=(10, 50)):
  """Hard masks [1, S, S, 2] from column ranges [lo, hi) (lungs: a list)."""
  maps = np.zeros((1, size, size, 2), np.float32)
  maps[0, heart_rows[0]:heart_rows[1], heart_cols[0]:heart_cols[1], 0] = 1
  for lo, hi in lung_cols:
    maps[0, lung_rows[0]:lung_rows[1], lo:hi, 1] = 1
  return maps


def _ctr(maps, **kwargs):
  ctr, valid = segment.ctr_of(jnp.asarray(maps), from_logits=False, **kwargs)
  return float(ctr[0]), bool(valid[0])


# ---------------------------------------------------------------------------
# ctr_of on hand-made masks.


def test_ctr_of_hard_masks():
  # Heart columns 26..37 (12); lungs 8..25 and 34..55: thorax 8..55 (48).
  maps = _maps((26, 38), [(8, 26), (34, 56)])
  assert _ctr(maps) == (pytest.approx(12 / 48), True)


def test_ctr_of_logits_equals_probabilities():
  maps = _maps((26, 38), [(8, 26), (34, 56)])
  logits = jnp.where(maps > 0, 12.0, -12.0)
  ctr, valid = segment.ctr_of(logits)
  assert bool(valid[0])
  assert float(ctr[0]) == pytest.approx(12 / 48, abs=1e-4)


def test_ctr_of_ignores_speckle():
  maps = _maps((26, 38), [(8, 26), (34, 56)])
  speckled = maps.copy()
  speckled[0, 5, 2:4, 0] = 1.0     # heart speck far to the left
  speckled[0, 60, 61, 0] = 0.9     # and one far right, bottom
  speckled[0, 2, 60:62, 1] = 1.0   # lung speck outside the thorax
  assert _ctr(speckled) == pytest.approx(_ctr(maps))


def test_ctr_of_lungs_meeting_in_projection():
  # The lungs overlap in columns (behind the heart): one run, same extent.
  maps = _maps((26, 38), [(8, 30), (28, 56)])
  assert _ctr(maps)[0] == pytest.approx(12 / 48)


def test_ctr_of_one_lung_only_measures_that_lung():
  maps = _maps((26, 38), [(34, 56)])
  assert _ctr(maps)[0] == pytest.approx(12 / 22)


def test_ctr_of_uncertain_border_adds_a_share_of_a_column():
  maps = _maps((26, 38), [(8, 26), (34, 56)])
  maps[0, 30:45, 25, 0] = 0.3      # left of the heart: 0.3 of a column
  maps[0, 30:45, 38, 0] = 0.2      # right of it: 0.2
  maps[0, 30:45, 40, 0] = 0.45     # not adjacent: ignored
  assert _ctr(maps)[0] == pytest.approx(12.5 / 48)


def test_ctr_of_weak_column_is_outside():
  maps = _maps((26, 38), [(8, 26), (34, 56)])
  maps[0, 30:45, 37, 0] = 0.5      # not above the level: outside
  assert _ctr(maps)[0] == pytest.approx((11 + 0.5) / 48)


def test_ctr_of_empty_heart_or_lungs_is_invalid():
  empty_heart = _maps((0, 0), [(8, 26), (34, 56)])
  ctr, valid = _ctr(empty_heart)
  assert not valid and np.isnan(ctr)
  empty_lungs = _maps((26, 38), [])
  assert not _ctr(empty_lungs)[1]


def test_ctr_of_is_per_image_and_jits():
  a = _maps((26, 38), [(8, 26), (34, 56)])
  b = _maps((20, 44), [(4, 30), (34, 60)])
  batch = jnp.asarray(np.concatenate([a, b, a]))
  ctr, valid = jax.jit(functools.partial(segment.ctr_of, from_logits=False))(
      batch)
  np.testing.assert_allclose(ctr, [12 / 48, 24 / 56, 12 / 48], rtol=1e-6)
  assert np.all(valid)


# ---------------------------------------------------------------------------
# Loss and model.


def test_loss_is_small_for_the_truth_and_larger_for_a_wrong_mask():
  maps = _maps((26, 38), [(8, 26), (34, 56)])
  heart, lung = jnp.asarray(maps[..., :1]), jnp.asarray(maps[..., 1:])
  right = jnp.where(maps > 0, 8.0, -8.0)
  shifted = jnp.roll(right, 10, axis=2)
  assert float(segment.segmenter_loss(right, heart, lung)) < 0.01
  assert float(segment.segmenter_loss(shifted, heart, lung)) > 0.3
  # uint8 masks as the dataset stores them give the same loss.
  as_u8 = segment.segmenter_loss(shifted, heart.astype(jnp.uint8),
                                 lung.astype(jnp.uint8))
  assert float(as_u8) == pytest.approx(
      float(segment.segmenter_loss(shifted, heart, lung)))


def test_soft_dice_of_identical_maps_is_one():
  maps = jnp.asarray(_maps((26, 38), [(8, 26), (34, 56)]))
  np.testing.assert_allclose(segment.soft_dice(maps, maps), [[1.0, 1.0]])


def test_segmenter_shapes():
  model = Segmenter(width=4, depth=2)
  x = jnp.zeros((2, 32, 32, 1))
  params = model.init(jax.random.key(0), x)["params"]
  logits = model.apply({"params": params}, x)
  assert logits.shape == (2, 32, 32, 2) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="divisible"):
    model.apply({"params": params}, jnp.zeros((1, 30, 30, 1)))


def test_space_to_depth_inverts_depth_to_space():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  folded = space_to_depth(x, 2)
  assert folded.shape == (2, 4, 4, 12)
  np.testing.assert_array_equal(depth_to_space(folded, 2), x)


def test_segmenter_with_patch_outlines_every_pixel():
  model = Segmenter(width=4, depth=2, patch=2)
  x = jnp.zeros((1, 32, 32, 1))
  params = model.init(jax.random.key(0), x)["params"]
  assert model.apply({"params": params}, x).shape == (1, 32, 32, 2)
  assert params["head"]["kernel"].shape[-1] == 2 * 4
  with pytest.raises(ValueError, match="divisible"):
    model.apply({"params": params}, jnp.zeros((1, 20, 20, 1)))


def _batch():
  maps = np.concatenate([_maps((26, 38), [(8, 26), (34, 56)]),
                         _maps((22, 40), [(6, 28), (32, 58)])])
  image = np.where(maps[..., 1:] > 0, -0.6, 0.4).astype(np.float32)
  return {"image": jnp.asarray(image),
          "heart_mask": jnp.asarray(maps[..., :1], jnp.uint8),
          "lung_mask": jnp.asarray(maps[..., 1:], jnp.uint8),
          "ctr": jnp.asarray([12 / 48, 18 / 52], jnp.float32)}


def test_augment_without_ranges_is_the_identity():
  batch = _batch()
  same = segment.augment(jax.random.key(0), batch, max_shift=0.0,
                         max_zoom=0.0, max_contrast=0.0, max_gamma=0.0)
  np.testing.assert_allclose(same["image"], batch["image"], atol=1e-6)
  np.testing.assert_allclose(same["heart_mask"], batch["heart_mask"])
  assert same["ctr"] is batch["ctr"]


def test_augment_moves_masks_with_the_image_and_keeps_the_ctr():
  batch = _batch()
  moved = segment.augment(jax.random.key(3), batch)
  assert float(jnp.min(moved["image"])) >= -1.0
  assert float(jnp.max(moved["image"])) <= 1.0
  assert 0.0 <= float(jnp.min(moved["lung_mask"]))
  assert float(jnp.max(moved["lung_mask"])) <= 1.0
  assert not np.allclose(moved["lung_mask"], batch["lung_mask"])
  # The image's lung-dark pixels sit where the moved lung mask is.
  dark = np.asarray(moved["image"]) < np.median(np.asarray(moved["image"]))
  assert np.mean(dark[np.asarray(moved["lung_mask"]) > 0.9]) > 0.95
  maps = jnp.concatenate([moved["heart_mask"], moved["lung_mask"]], -1)
  ctr, valid = segment.ctr_of(maps, from_logits=False)
  assert np.all(valid)
  np.testing.assert_allclose(ctr, batch["ctr"], atol=0.03)


def test_augmented_step_draws_by_step():
  model = segment.segmenter_model(width=4, depth=2)
  init = segment.segmenter_init_fn(4, S, 1e-3, 10, depth=2)
  step = jax.jit(functools.partial(segment.segmenter_train_step, model=model,
                                   augment_key=jax.random.key(7)))
  state = init(jax.random.key(0))
  _, a = step(state, _batch())
  _, b = step(state, _batch())
  _, c = step(state.replace(step=state.step + 1), _batch())
  assert float(a["loss"]) == float(b["loss"])
  assert float(a["loss"]) != float(c["loss"])


def test_init_fn_builds_the_seg_network():
  init = segment.segmenter_init_fn(4, 32, 1e-3, 10, depth=2)
  shapes = jax.eval_shape(init, jax.random.key(0))
  assert set(shapes.params) == {segment.SEG}
  assert set(shapes.opt_state) == {segment.SEG}


# ---------------------------------------------------------------------------
# Training on the fixture.


@pytest.fixture(scope="module")
def fixture_train(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("outlined"))
  tfds_outlines.prepare_outlines(FIXTURE, out, size=32, seed=0)
  return pipeline.open_source(out, "train")


def test_training_on_the_fixture_reduces_the_loss(fixture_train):
  steps = 200
  model = segment.segmenter_model(width=4, depth=3)
  state = segment.segmenter_init_fn(4, 32, 1e-2, steps, depth=3)(
      jax.random.key(0))
  step = jax.jit(functools.partial(segment.segmenter_train_step, model=model),
                 donate_argnums=0)
  batches = pipeline.classifier_batches(
      fixture_train, batch_size=6, seed=0,
      fields=("heart_mask", "lung_mask", "ctr"))
  history = []
  for _ in range(steps):
    state, metrics = step(state, next(batches))
    history.append({k: float(v) for k, v in metrics.items()})
  assert int(state.step) == steps
  first = np.mean([h["loss"] for h in history[:10]])
  last = np.mean([h["loss"] for h in history[-10:]])
  assert last < 0.2 * first  # measured: 1.6 -> 0.03
  assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"])
             for h in history)
  assert history[-1]["valid"] == 1.0
  assert history[-1]["dice_lung"] > 0.8
  # The CTR read from its masks on the images it trained on.
  assert np.mean([h["ctr_mae"] for h in history[-10:]]) < 0.05
