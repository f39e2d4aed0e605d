"""Heart and lung segmentation, and the CTR read from its masks: pure jnp.

The segmenter (`models.segmenter.Segmenter`, network name "seg") is trained
on outlined radiographs (`data/tfds_outlines.py`) to predict the heart and
both lungs; `ctr_of` then measures the cardiothoracic ratio from its masks
the way the drawn CTR is measured (heart's horizontal extent over the
lungs' outer extent). Nothing here touches the host.

Measured on the real outlined set (benchmarks/segmenter_validation.py, 194
training / 65 test radiographs, 2-core CPU, ~5 min of training): test CTR
MAE 0.024 (r 0.93) at 64 px and 0.0195 (r 0.93) at 128 px, against 0.055
for always the training mean; drawn masks at those sizes give 0.009 / 0.004.

Batches are dicts of image float32 [B, S, S, 1] in [-1, 1], heart_mask and
lung_mask [B, S, S, 1] in {0, 1} (any dtype), ctr float32 [B]: what
`pipeline.classifier_batches(..., fields=("heart_mask", "lung_mask",
"ctr"))` yields.
"""
import jax
import jax.numpy as jnp
import optax

from agcg_jax import state as state_lib
from agcg_jax.models.segmenter import Segmenter
from agcg_jax.state import TrainState

SEG = "seg"
# A column is inside a mask when some pixel of it is more likely in than out:
# on hard masks, exactly the drawn CTR's definition of extent.
COLUMN_LEVEL = 0.5
# Thorax: column runs (in the projection) whose mass is below this share of
# the largest run's are speckle, not lung. A real lung's run holds ~half of
# the lung mass; a speck a few pixels.
LUNG_RUN_SHARE = 0.1
# Soft dice smoothing, in pixels: keeps an empty target from giving 0 / 0.
_DICE_EPS = 1.0


# ---------------------------------------------------------------------------
# Losses.


def bce(logits, target):
  """Mean binary cross-entropy of logits [...] against targets in [0, 1].

  Targets are 0 / 1 masks, soft only where `augment` interpolated a border.
  """
  return jnp.mean(optax.sigmoid_binary_cross_entropy(
      logits, target.astype(jnp.float32)))


def soft_dice(probs, target):
  """Soft dice per image and channel, [B, C], from [B, S, S, C] maps."""
  target = target.astype(jnp.float32)
  inter = jnp.sum(probs * target, axis=(1, 2))
  total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(target, axis=(1, 2))
  return (2.0 * inter + _DICE_EPS) / (total + _DICE_EPS)


def targets(heart, lung):
  """heart, lung [B, S, S, 1] -> float32 [B, S, S, 2] in the logits' order."""
  return jnp.concatenate([heart, lung], axis=-1).astype(jnp.float32)


def segmenter_loss(logits, heart, lung):
  """BCE + (1 - soft dice) of logits [B, S, S, 2] against the two masks.

  BCE alone is dominated by the background (the heart is ~10% of the
  image) and leaves borders soft; the dice term weighs each structure as a
  whole, whatever its size, which is what the extent depends on.
  """
  target = targets(heart, lung)
  dice = soft_dice(jax.nn.sigmoid(logits), target)
  return bce(logits, target) + 1.0 - jnp.mean(dice)


# ---------------------------------------------------------------------------
# The CTR of predicted masks.


def _runs(inside):
  """Columns [S] bool -> run ids [S] int32: 1, 2, ... per run, 0 outside."""
  start = inside & ~jnp.concatenate([jnp.zeros((1,), bool), inside[:-1]])
  return jnp.cumsum(start).astype(jnp.int32) * inside


def _width(prob, keep_share):
  """One map [S, S] in [0, 1] -> (width in columns, valid).

  Columns project to occupancy (max over rows) and mass (sum over rows);
  columns with occupancy > COLUMN_LEVEL form runs. Kept: the runs holding
  at least keep_share of the heaviest run's mass (keep_share 1: the
  heaviest alone). Width: first to last kept column, both included, plus
  the occupancy of the column just outside each end (< COLUMN_LEVEL), a
  sub-pixel share of a border the net is unsure of; 0 on hard masks.
  """
  size = prob.shape[1]
  occupancy = jnp.max(prob, axis=0)
  mass = jnp.sum(prob, axis=0)
  run = _runs(occupancy > COLUMN_LEVEL)
  run_mass = jax.ops.segment_sum(mass, run, num_segments=size + 1)
  run_mass = run_mass.at[0].set(0.0)
  kept_runs = run_mass >= keep_share * jnp.max(run_mass)
  kept = (run > 0) & kept_runs[run]
  valid = jnp.any(kept)
  cols = jnp.arange(size)
  first = jnp.min(jnp.where(kept, cols, size))
  last = jnp.max(jnp.where(kept, cols, -1))
  before = jnp.where(first > 0, occupancy[jnp.maximum(first - 1, 0)], 0.0)
  after = jnp.where(last < size - 1,
                    occupancy[jnp.minimum(last + 1, size - 1)], 0.0)
  width = (last - first + 1).astype(jnp.float32) + before + after
  return jnp.where(valid, width, 0.0), valid


def widths_of(probs):
  """Heart and thorax widths of probability maps [B, S, S, 2] (heart, lungs).

  The heart is its heaviest column run: speckle in columns apart from it is
  dropped (speckle in columns touching the run widens it). The thorax spans
  every lung run of at least LUNG_RUN_SHARE of the heaviest (the two lungs
  may or may not meet in the projection).

  Returns:
    (heart width [B], thorax width [B], valid bool [B]), widths in pixels;
    valid: both maps have a column above COLUMN_LEVEL.
  """
  heart_w, heart_ok = jax.vmap(lambda p: _width(p, 1.0))(probs[..., 0])
  thorax_w, lung_ok = jax.vmap(lambda p: _width(p, LUNG_RUN_SHARE))(
      probs[..., 1])
  return heart_w, thorax_w, heart_ok & lung_ok


def ctr_of(maps, *, from_logits: bool = True):
  """The cardiothoracic ratio of predicted masks.

  Args:
    maps: [B, S, S, 2] (heart, lungs): logits (from_logits) or
      probabilities in [0, 1] (hard 0/1 masks work too).
    from_logits: apply the sigmoid first.

  Returns:
    (ctr float32 [B], valid bool [B]); ctr is NaN where not valid (no heart
    or no lung column).
  """
  probs = jax.nn.sigmoid(maps) if from_logits else maps.astype(jnp.float32)
  heart_w, thorax_w, valid = widths_of(probs)
  ctr = heart_w / jnp.maximum(thorax_w, 1.0)
  return jnp.where(valid, ctr, jnp.nan), valid


# ---------------------------------------------------------------------------
# Augmentation.


def augment(key, batch, *, max_shift: float = 0.06, max_zoom: float = 0.1,
            max_contrast: float = 0.2, max_gamma: float = 0.3):
  """Random exposure and framing of each image, its masks moved with it.

  With ~200 training radiographs the net otherwise learns their exposures
  and positions by heart. Exposure: a gamma (log-uniform within
  +-max_gamma) on [0, 1] intensities, then contrast times 1 +- max_contrast
  about mid-grey. Framing: a zoom within 1 +- max_zoom about the centre and
  a shift within +-max_shift of the side, applied bilinearly to the image
  and the masks (which become soft at borders). No flips: the heart lies
  to the patient's left, and a mirrored chest is not a radiograph. Zoom and
  shift leave the CTR as it is (a ratio of horizontal widths) unless they
  push a lung edge out of the frame (the widest chests leave ~5% of the side
  free); the masks stay the truth of the moved image either way, and the
  loss reads only them (the batch's `ctr` is then slightly off).

  Args:
    key: a PRNG key; each image draws its own values from it.
    batch: dict with image [B, S, S, 1] in [-1, 1], heart_mask, lung_mask
      [B, S, S, 1]; other fields pass through.

  Returns:
    The batch with image (still in [-1, 1]) and the masks (float32 in
    [0, 1]) replaced.
  """
  image = batch["image"]
  b, size = image.shape[0], image.shape[1]
  k_gamma, k_contrast, k_zoom, k_shift = jax.random.split(key, 4)
  uniform = lambda k, shape, r: jax.random.uniform(k, shape, minval=-r,
                                                   maxval=r)
  gamma = jnp.exp(uniform(k_gamma, (b, 1, 1, 1), max_gamma))
  contrast = 1.0 + uniform(k_contrast, (b, 1, 1, 1), max_contrast)
  x = jnp.clip((image + 1.0) * 0.5, 0.0, 1.0) ** gamma
  x = jnp.clip((x - 0.5) * contrast + 0.5, 0.0, 1.0) * 2.0 - 1.0
  zoom = 1.0 + uniform(k_zoom, (b,), max_zoom)
  shift = uniform(k_shift, (b, 2), max_shift) * size
  stack = jnp.concatenate([x, batch["heart_mask"].astype(jnp.float32),
                           batch["lung_mask"].astype(jnp.float32)], axis=-1)

  def frame(img, z, t):
    # Zoom about the centre: out = z * in + (1 - z) * S / 2 + t.
    translation = (1.0 - z) * size / 2.0 + t
    return jax.image.scale_and_translate(
        img, img.shape, (0, 1), jnp.stack([z, z]), translation, "linear",
        antialias=False)

  # Outside the frame: black image (-1), no mask.
  moved = jax.vmap(frame)(stack.at[..., :1].add(1.0), zoom, shift)
  return {**batch, "image": moved[..., :1] - 1.0,
          "heart_mask": moved[..., 1:2], "lung_mask": moved[..., 2:3]}


# ---------------------------------------------------------------------------
# Model, state and steps.


def segmenter_model(width: int = 16, depth: int = 4, patch: int = 1
                    ) -> Segmenter:
  return Segmenter(width=width, depth=depth, patch=patch)


def segmenter_init_fn(width: int, size: int, lr: float, total_steps: int, *,
                      depth: int = 4, patch: int = 1):
  """init(key) -> TrainState with the network "seg"; pure (eval_shape-able).

  Adam(0.9, 0.999) at `lr`, decayed linearly to 0 over the last 30% of
  `total_steps` (the CTR regressor's schedule).
  """
  tx = {SEG: state_lib.adam(lr, 0.9, 0.999, total_steps, 0.7)}
  return state_lib.make_init_fn({SEG: segmenter_model(width, depth, patch)},
                                tx, (size, size, 1))


def segmenter_train_step(state: TrainState, batch, *, model, augment_key=None):
  """One step of the segmenter (network name "seg"). Donate `state`.

  augment_key: None, or a key: the batch is then `augment`ed with
  fold_in(augment_key, step), so a resumed run draws the same.

  Returns (new state, metrics): loss, dice_heart, dice_lung (soft, batch
  mean), ctr_mae over valid images, valid (share), grad_norm.
  """
  if augment_key is not None:
    batch = augment(jax.random.fold_in(augment_key, state.step), batch)

  def loss_fn(p):
    logits = model.apply({"params": p}, batch["image"])
    return segmenter_loss(logits, batch["heart_mask"],
                          batch["lung_mask"]), logits
  (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params[SEG])
  metrics = {"loss": loss, **_scores(logits, batch),
             "grad_norm": optax.global_norm(g)}
  return state.apply_gradients({SEG: g}), metrics


def _scores(logits, batch):
  dice = jnp.mean(soft_dice(jax.nn.sigmoid(logits),
                            targets(batch["heart_mask"], batch["lung_mask"])),
                  axis=0)
  ctr, valid = ctr_of(logits)
  err = jnp.where(valid, jnp.abs(ctr - batch["ctr"]), 0.0)
  return {"dice_heart": dice[0], "dice_lung": dice[1],
          "ctr_mae": jnp.sum(err) / jnp.maximum(jnp.sum(valid), 1),
          "valid": jnp.mean(valid.astype(jnp.float32))}


def segmenter_predict(params, images, *, model):
  """Per image: {"ctr": [B] (NaN if not valid), "valid": [B], "probs": [B, S, S, 2]}."""
  logits = model.apply({"params": params[SEG]}, images)
  ctr, valid = ctr_of(logits)
  return {"ctr": ctr, "valid": valid, "probs": jax.nn.sigmoid(logits)}
