"""Each score of metrics.py against values computed by hand on tiny maps."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agcg_jax import evaluate
from agcg_jax import metrics as M


def _b(*maps):
  return jnp.asarray(np.stack([np.asarray(m, np.float32) for m in maps]))


def test_region_and_total_mass_and_area():
  m = _b([[1, 2], [3, 4]])
  region = _b([[1, 0], [0, 1]]).astype(bool)
  np.testing.assert_allclose(M.region_mass(m, region), [5.0])
  np.testing.assert_allclose(M.total_mass(m), [10.0])
  np.testing.assert_allclose(M.area(region), [2.0])


def test_positive_clips_only_below_zero():
  np.testing.assert_array_equal(M.positive(jnp.asarray([-1.0, 0.0, 0.5])), [0.0, 0.0, 0.5])


def test_enrichment_by_hand():
  # Mass 6 of 10 on a region of 2 pixels out of a reference of 8: (0.6) / (0.25) = 2.4.
  assert M.enrichment(6.0, 10.0, 2.0, 8.0) == pytest.approx(2.4)
  # Pooled over images: sums first, then the ratio.
  assert M.enrichment([1.0, 5.0], [4.0, 6.0], [1.0, 1.0], [4.0, 4.0]) == pytest.approx(0.6 / 0.25)
  # A map uniform over the reference scores exactly 1 (chance).
  body = np.zeros((1, 4, 4), bool)
  body[0, :, :2] = True
  supp = np.zeros_like(body)
  supp[0, 0, 0] = True
  uniform = body.astype(np.float32)
  e = M.enrichment(M.region_mass(jnp.asarray(uniform), supp), M.total_mass(jnp.asarray(uniform)),
                   M.area(supp), M.area(body))
  assert e == pytest.approx(1.0)
  assert math.isnan(M.enrichment(1.0, 1.0, 0.0, 4.0))


def test_pearson_by_hand_and_masked():
  a = _b([[1, 2], [3, 4]])
  np.testing.assert_allclose(M.pearson(a, 2 * a + 1), [1.0], atol=1e-6)
  np.testing.assert_allclose(M.pearson(a, -a), [-1.0], atol=1e-6)
  # x = 1, 2, 3 against y = 1, 3, 2: cov = 0.5 / var 1 -> r = 0.5 (4th pixel masked out).
  b = _b([[1, 3], [2, 100]])
  mask = _b([[1, 1], [1, 0]])
  np.testing.assert_allclose(M.pearson(a, b, mask), [0.5], atol=1e-6)
  np.testing.assert_allclose(M.pearson(a, jnp.ones_like(a)), [0.0])


def test_topk_iou_by_hand():
  m = _b([[0.9, 0.1, 0.8], [0.0, 0.7, 0.2], [0.0, 0.0, 0.0]])
  supp = _b([[1, 1, 0], [0, 1, 0], [0, 0, 0]]).astype(bool)
  # k = 3: top pixels (0,0), (0,2), (1,1); 2 of them on the support: IoU = 2 / 4.
  np.testing.assert_allclose(M.topk_iou(m, supp), [0.5])
  np.testing.assert_allclose(M.topk_iou(supp.astype(jnp.float32), supp), [1.0])
  # Restricted to `within`, pixels outside never count among the top.
  within = _b([[1, 1, 0], [1, 1, 0], [1, 1, 1]]).astype(bool)
  np.testing.assert_allclose(M.topk_iou(m, supp, within), [1.0])  # top: 0.9, 0.7, 0.1
  assert M.topk_iou_chance(0.5) == pytest.approx(1 / 3)


def test_topk_iou_ties_take_exactly_k():
  supp = _b([[1, 0], [0, 0]]).astype(bool)
  flat = jnp.ones((1, 2, 2))
  # All tied: the first pixel in order is taken, exactly one pixel: IoU 1 (it is the support).
  np.testing.assert_allclose(M.topk_iou(flat, supp), [1.0])


def _topk_iou_by_sorting(maps, support, within=None):
  """The sort-based definition topk_iou must equal: rank every pixel (stable, highest first)."""
  b = maps.shape[0]
  flat = np.asarray(maps, np.float32).reshape(b, -1)
  supp = np.asarray(support, bool).reshape(b, -1)
  if within is not None:
    flat = np.where(np.asarray(within, bool).reshape(b, -1), flat, -np.inf)
  ranks = np.argsort(np.argsort(-flat, axis=1, kind="stable"), axis=1, kind="stable")
  top = ranks < supp.sum(1, keepdims=True)
  union = (top | supp).sum(1)
  return np.where(union > 0, (top & supp).sum(1) / np.maximum(union, 1), 0.0)


def test_kth_smallest_equals_sorting():
  rng = np.random.default_rng(3)
  # Ties, negatives, both zeros, infinities and tiny values: every order the keys must keep.
  pool = np.array([-np.inf, -2.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.5, 3.0, np.inf], np.float32)
  values = np.concatenate([rng.choice(pool, (6, 40)), rng.normal(size=(6, 40)).astype(np.float32)], 1)
  mask = rng.uniform(size=values.shape) < 0.6
  count = mask.sum(1)
  for k in (np.zeros(6, np.int32), (count - 1) // 2, count - 1, rng.integers(0, count)):
    want = np.sort(np.where(mask, values, np.inf), 1)[np.arange(6), k]
    got = np.asarray(jax.jit(M.kth_smallest)(values, mask, k))
    np.testing.assert_array_equal(got == 0, want == 0)  # -0.0 and 0.0 are one value, as in a sort
    np.testing.assert_array_equal(np.where(got == 0, 0.0, got), np.where(want == 0, 0.0, want))


@pytest.mark.parametrize("with_within", [False, True])
def test_topk_iou_equals_sorting(with_within):
  rng = np.random.default_rng(4)
  # Coarse values (many ties, also at the k-th value), empty and full supports.
  maps = np.round(rng.uniform(-1, 1, (8, 16, 16)) * 4).astype(np.float32) / 4
  maps[2] = 0.0
  supp = rng.uniform(size=maps.shape) < rng.uniform(0, 0.5, (8, 1, 1))
  supp[3], supp[4] = False, True
  within = (rng.uniform(size=maps.shape) < 0.7) | supp if with_within else None
  got = np.asarray(jax.jit(M.topk_iou)(jnp.asarray(maps), jnp.asarray(supp),
                                       None if within is None else jnp.asarray(within)))
  np.testing.assert_allclose(got, _topk_iou_by_sorting(maps, supp, within), rtol=1e-6)
  assert got[3] == 0.0 and got[4] == 1.0


def test_truth_support_threshold_and_body():
  g = M.GREY
  real = _b([[0.0, 0.0], [0.0, 0.0]])
  twin = _b([[9 * g, 7 * g], [-9 * g, 20 * g]])
  body = _b([[1, 1], [1, 0]])
  np.testing.assert_array_equal(np.asarray(M.truth_support(real, twin, body)),
                                [[[True, False], [True, False]]])


def test_counterfactual_error_by_hand():
  real = _b(np.zeros((2, 2)))
  twin = _b(np.full((2, 2), 1.0))
  np.testing.assert_allclose(M.counterfactual_error(twin, real, twin), 0.0)
  np.testing.assert_allclose(M.counterfactual_error(real, real, twin), 1.0)
  np.testing.assert_allclose(M.counterfactual_error(_b(np.full((2, 2), 0.25)), real, twin), 0.75)


def test_box_mask_uses_pixel_edges():
  m = np.asarray(M.box_mask(jnp.asarray([[1.0, 0.0, 3.0, 2.0]]), 4))[0]
  want = np.zeros((4, 4), bool)
  want[0:2, 1:3] = True
  np.testing.assert_array_equal(m, want)


def test_pointing_and_fixed_point():
  m = np.zeros((2, 4, 4), np.float32)
  m[0, 1, 2] = 1.0  # max at x=2, y=1 -> centre (2.5, 1.5)
  m[1, 3, 0] = 1.0
  boxes = jnp.asarray([[2.0, 1.0, 3.0, 2.0], [2.0, 1.0, 3.0, 2.0]])
  np.testing.assert_allclose(M.argmax_point(jnp.asarray(m))[0], [2.5, 1.5])
  np.testing.assert_array_equal(M.pointing(jnp.asarray(m), boxes), [True, False])
  np.testing.assert_array_equal(M.point_in_box(jnp.asarray([2.5, 1.5]), boxes), [True, True])
  np.testing.assert_array_equal(M.point_in_box(jnp.asarray([3.0, 1.5]), boxes), [False, False])
  np.testing.assert_allclose(M.box_centre([[0, 0, 4, 2]]), [[2.0, 1.0]])


def test_direction_correct_is_strict():
  before = jnp.asarray([0.4, 0.4, 0.6, 0.6])
  after = jnp.asarray([0.5, 0.4, 0.5, 0.7])
  up = jnp.asarray([True, True, False, False])
  np.testing.assert_array_equal(M.direction_correct(before, after, up), [True, False, True, False])


def test_functions_jit():
  m = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 8, 8)), jnp.float32)
  s = m > 0.7
  np.testing.assert_allclose(jax.jit(M.topk_iou)(m, s), M.topk_iou(m, s))
  np.testing.assert_allclose(jax.jit(M.pearson)(m, s.astype(jnp.float32)), M.pearson(m, s.astype(jnp.float32)),
                             rtol=1e-6)


def _sums(**kw):
  base = {f"conf_{k}_{i}{j}": 0.0 for k in "ot" for i in range(2) for j in range(2)}
  base.update(n=0.0, r_cam_attention=0.0, flips_y0=0.0, flips_y1=0.0)
  base.update(kw)
  return base


def test_summarize_classifier_numbers_by_hand():
  # 3 No Finding (2 right), 1 Cardiomegaly (right); translations: all but one NF flipped.
  s = _sums(n=4.0, conf_o_00=2.0, conf_o_01=1.0, conf_o_11=1.0,
            conf_t_01=2.0, conf_t_00=1.0, conf_t_10=1.0, flips_y0=2.0, flips_y1=1.0, r_cam_attention=2.0)
  m = evaluate.summarize(s)
  assert m["accuracy_original"] == pytest.approx(0.75)
  assert m["accuracy_translated"] == pytest.approx(0.25)
  assert m["accuracy_chance"] == pytest.approx(0.75)
  assert m["flip_rate"] == pytest.approx(0.75)
  assert m["flip_rate_by_class"] == {"No Finding": pytest.approx(2 / 3), "Cardiomegaly": pytest.approx(1.0)}
  assert m["cam_attention_pearson"] == pytest.approx(0.5)


def test_summarize_truth_and_boxes_by_hand():
  truth = {"supp_area": 10.0, "body_area": 100.0, "flip_twin": 2.0, "mae_fake_twin": 1.0,
           "mae_real_twin": 4.0, "change_in": 10.0 * M.GREY * 30, "change_out": 90.0 * M.GREY * 2,
           "area_out": 90.0, "ruler_dir": 3.0, "ruler_shift_y0": 0.2, "ruler_shift_y1": -0.1,
           "ruler_twin_order": 4.0, "ruler_abs_err": 0.08,
           "ruler_valid": 4.0, "ruler_valid_fake": 3.0, "ruler_both_y0": 2.0, "ruler_both_y1": 1.0}
  for name in evaluate.SCORED_MAPS:
    truth.update({f"truth_in_{name}": 5.0, f"truth_all_{name}": 10.0, f"truth_r_{name}": 2.0,
                  f"truth_iou_{name}": 1.0})
  boxes = {"n_box": 2.0, "box_area": 0.5}
  for name in evaluate.BOX_MAPS:
    boxes.update({f"box_in_{name}": 3.0, f"box_all_{name}": 4.0, f"box_point_{name}": 1.0})
  baselines = {"prior_box_enrichment": 1.5, "fixed_point_pointing": 1.0, "box_baseline_source": "x"}
  m = evaluate.summarize(_sums(n=4.0, conf_o_00=2.0, conf_o_11=2.0, **truth, **boxes), baselines)
  assert m["truth_support_share"] == pytest.approx(0.1)
  assert m["attention_truth_enrichment"] == pytest.approx(5.0)  # (5/10) / (10/100)
  assert m["attention_truth_pearson"] == pytest.approx(0.5)
  assert m["truth_topk_iou_chance"] == pytest.approx(0.1 / 1.9)
  assert m["counterfactual_error"] == pytest.approx(0.25)
  assert m["change_inside_truth"] == pytest.approx(30.0)
  assert m["change_outside_truth"] == pytest.approx(2.0)
  assert m["flip_rate_twin"] == pytest.approx(0.5)
  assert m["ctr_direction_correct_model_free"] == pytest.approx(0.75)
  assert m["ctr_shift_model_free"]["to_cardiomegaly"] == pytest.approx(0.1)  # 0.2 over 2 NF images
  assert m["ruler_mae"] == pytest.approx(0.02)
  assert m["ctr_shift_model_free"]["to_no_finding"] == pytest.approx(-0.1)  # over 1 measured pair
  assert m["ruler_measured_translated"] == pytest.approx(0.75)
  assert m["box_area_share"] == pytest.approx(0.25)
  assert m["attention_box_enrichment"] == pytest.approx(3.0)  # (3/4) / 0.25
  assert m["attention_pointing"] == pytest.approx(0.5)
  assert m["fixed_point_pointing"] == pytest.approx(1.0)
  assert "prior_box_enrichment" not in evaluate.summarize(_sums(n=4.0, **boxes))


def test_box_baselines_from_training_boxes_by_hand():
  # One training box covering the left half of an 4x4 image: prior = 1 there, 0 elsewhere.
  train = [[0, 0, 2, 4]]
  test = [[0, 0, 2, 2],   # inside the prior: mass share 4/8 = 0.5, area share 4/16
          [2, 0, 4, 4]]   # outside: share 0, area share 8/16
  b = M.box_baselines(test, train, 4)
  # pooled: (4 + 0) / (8 + 8) = 0.25 over mean area share (0.25 + 0.5) / 2 = 0.375
  assert b["prior_box_enrichment"] == pytest.approx(0.25 / 0.375)
  # fixed point (1, 2): in box 0? y=2 is not < 2 -> no; box 1 -> no.
  assert b["fixed_point_pointing"] == 0.0
  assert b["box_baseline_source"] == "training boxes"


def test_box_baselines_leave_one_out_without_training_boxes():
  # Two identical test boxes: each one's prior is the other, exactly itself.
  test = [[0, 0, 2, 2], [0, 0, 2, 2], [2, 2, 4, 4]]
  b = M.box_baselines(test, np.zeros((0, 4)), 4)
  # Box 0: others = box1 + box2 -> mass in box 0 = 4 of 8. Same for box 1. Box 2: others in it 0 of 8.
  assert b["prior_box_enrichment"] == pytest.approx((4 + 4 + 0) / 24 / 0.25)
  # LOO centres: box0 -> mean of (1,1), (3,3) = (2, 2) not in [0,2); box2 -> (1, 1) not in box2.
  assert b["fixed_point_pointing"] == 0.0
  assert "leave-one-out" in b["box_baseline_source"]
  assert M.box_baselines([[0, 0, 1, 1]], np.zeros((0, 4)), 4)["fixed_point_pointing"] is None


def test_summarize_empty_is_a_user_error():
  from agcg_jax.errors import UserError
  with pytest.raises(UserError, match="empty"):
    evaluate.summarize(_sums())


def test_box_swap_margin_is_zero_for_a_fixed_prior_and_high_for_a_map_on_its_own_box():
  size = 32
  rng = np.random.default_rng(0)
  x0 = rng.uniform(2, 14, 20)
  y0 = rng.uniform(2, 14, 20)
  boxes = np.stack([x0, y0, x0 + 12, y0 + 12], 1)
  own = M.box_coverage(boxes, size, size)
  # A map on its own box only: margin = 1 - mean share in the other boxes (> 0).
  margins = M.box_swap_margins(own, boxes, size)
  assert np.all(margins > 0) and margins.mean() > 0.3
  # The same map for every image (a fixed prior, here the mean box): mean margin exactly 0.
  prior = np.broadcast_to(own.mean(0), own.shape)
  assert abs(M.box_swap_margins(prior, boxes, size).mean()) < 1e-12
  # Swapping the maps between images destroys the margin.
  swapped = M.box_swap_margins(own[::-1], boxes, size)
  assert swapped.mean() < margins.mean() - 0.3


def test_box_coverage_counts_partial_cells_and_pooling_keeps_the_mass():
  cover = M.box_coverage(np.array([[0.0, 0.0, 3.0, 2.0]]), 4, 2)  # 2 px cells
  np.testing.assert_allclose(cover[0], [[1.0, 0.5], [0.0, 0.0]])
  maps = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
  pooled = M.pool_map(maps, grid=4)
  assert pooled.shape == (2, 4, 4)
  np.testing.assert_allclose(pooled.sum((1, 2)) * 4, maps.sum((1, 2)))


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data():
  rng = np.random.default_rng(1)
  small, large = rng.normal(0.2, 1.0, 20), rng.normal(0.2, 1.0, 2000)
  lo, hi = M.bootstrap_ci(small)
  assert lo < small.mean() < hi
  lo2, hi2 = M.bootstrap_ci(large)
  assert hi2 - lo2 < (hi - lo) / 4 and lo2 > 0


def test_lateral_border_band_and_thorax_by_hand():
  heart = np.zeros((1, 6, 8), bool)
  heart[0, 2:4, 3:6] = True  # rows 2-3, columns 3..5
  band = np.asarray(M.lateral_border_band(jnp.asarray(heart), 1))[0]
  assert band[:2].sum() == 0 and band[4:].sum() == 0  # no heart, no band
  np.testing.assert_array_equal(np.nonzero(band[2])[0], [2, 3, 4, 5, 6])  # 3±1 and 5±1
  lungs = np.zeros((1, 6, 8), bool)
  lungs[0, 1:5, 0] = True
  lungs[0, 1:5, 7] = True
  thorax = np.asarray(M.thorax_mask(jnp.asarray(heart), jnp.asarray(lungs)))[0]
  assert thorax[1:5].all() and not thorax[0].any() and not thorax[5].any()
  assert M.border_width(64) == 2 and M.border_width(128) == 4
  x = np.array([0.4, 0.5, 0.6, 0.7])
  y = 2 * x + 0.1
  assert abs(M.pooled_pearson(x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum(), 4)
             - 1.0) < 1e-9


def test_gaussian_prior_scores_high_on_boxes_where_boxes_usually_are():
  size = 32
  same = [[8, 8, 24, 24]] * 4                   # every box in the same place
  far = same[:3] + [[0, 0, 6, 6]]               # one box in a corner
  on = M.box_baselines(same, np.zeros((0, 4)), size)["gaussian_prior_box_enrichment"]
  off = M.box_baselines(far, np.zeros((0, 4)), size)["gaussian_prior_box_enrichment"]
  # Centre (16, 16), sigmas 8: the image spans +-2 sigma and the box +-1 sigma on each axis, so
  # the box holds (erf(1/sqrt2) / erf(2/sqrt2))^2 of the mass, over an area share of 1/4.
  expected = (math.erf(1 / math.sqrt(2)) / math.erf(2 / math.sqrt(2))) ** 2 / 0.25
  assert on == pytest.approx(expected, rel=0.01)
  # A box far from the others drags the mean down.
  assert off < on
