"""Pure, jit-able step functions. No I/O; nothing here touches the host.

Batches are dicts of [B, H, W, 1] float32 images in [-1, 1]; the GAN batch is
{"no_finding": ..., "cardiomegaly": ...} (unpaired), the classifier batch
{"image": ..., "label": int32 [B]}.
"""
import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from agcg_jax import losses
from agcg_jax.data.records import CLASS_KEYS, other
from agcg_jax.state import ATT, DIS, GEN, TrainState


def translate(models: Mapping[str, nn.Module], params, target: str, src: jnp.ndarray):
  """Translate `src` into domain `target` (paper Equ. 8).

  fake = A_t(src) * G_t(src) + (1 - A_t(src)) * src. Returns (fake, attention,
  generated), each [B, H, W, 1]; attention in [0, 1], the others in [-1, 1].
  """
  att = models[ATT[target]].apply({"params": params[ATT[target]]}, src)
  gen = models[GEN[target]].apply({"params": params[GEN[target]]}, src)
  fake = att * gen + (1.0 - att) * src
  return fake, att, gen


def _global_norm(tree) -> jnp.ndarray:
  return optax.global_norm(tree)


def second_stage(step, cfg, total_steps: int):
  """Whether the optional second training stage is on at `step` (a traced bool).

  The original AG-CycleGAN trains everything, then freezes the attention nets
  and shows the discriminators only the attended region (attention > tau).
  The paper did not use it; `gan.two_stage_start` (a fraction of the run,
  >= 1 = never) turns it on.
  """
  if cfg.two_stage_start >= 1.0:
    return jnp.zeros((), bool)
  return step >= int(cfg.two_stage_start * total_steps)


def _attended(image, attention, on, tau):
  """image, or in the second stage only its attended region (attention > tau)."""
  return jnp.where(on, image * (attention > tau).astype(image.dtype), image)


def attention_prior_scale(step, cfg, total_steps: int):
  """Factor on the attention priors' weights at `step` (traced; 1 unless ramped).

  `gan.attention_prior_start` = s and `gan.attention_prior_ramp` = r: the factor
  grows linearly from s at step 0 to 1 at r x the run, then stays 1. Weak priors
  early let the translation learn to change the image; the full weight later
  prunes the diffuse attention that the weak priors leave.
  """
  if cfg.attention_prior_ramp <= 0.0 or cfg.attention_prior_start == 1.0:
    return jnp.ones((), jnp.float32)
  frac = jnp.clip(step / max(cfg.attention_prior_ramp * total_steps, 1.0), 0.0, 1.0)
  return cfg.attention_prior_start + (1.0 - cfg.attention_prior_start) * frac


def gan_generator_loss(gen_params, dis_params, batch, *, models, cfg, second=False,
                       prior_scale=1.0):
  """Adversarial + cycle (+ optional identity) loss of both translations.

  Returns (loss, (fakes, metrics)); fakes (what the discriminators see) are
  stop_gradient'ed so the discriminator loss cannot reach the generators
  through them.
  """
  params = {**gen_params, **dis_params}
  fakes, metrics, adv, cyc, idt, att_l1, att_tv = {}, {}, 0.0, 0.0, 0.0, 0.0, 0.0
  for target in CLASS_KEYS:
    src = batch[other(target)]
    fake, att, _ = translate(models, params, target, src)
    # The cycle path recomputes attention on the translated image (DESIGN.md).
    rec, _, _ = translate(models, params, other(target), fake)
    seen = _attended(fake, att, second, cfg.attention_threshold)
    logits = models[DIS[target]].apply({"params": params[DIS[target]]}, seen)
    adv_t = losses.g_loss(logits, cfg.adv_loss)
    cyc_t = losses.cycle_loss(rec, src, cfg.cycle_loss)
    adv += adv_t
    cyc += cyc_t
    metrics[f"g_adv_{target}"] = adv_t
    metrics[f"cycle_{other(target)}"] = cyc_t
    metrics[f"attention_mean_{target}"] = jnp.mean(att)
    # Optional attention priors (not in the paper; GANimation's L1 + TV on
    # its attention mask): a sparse, smooth map says "where" more sharply.
    att_l1 += losses.attention_amount(att, cfg.attention_target)
    att_tv += (jnp.mean(jnp.abs(att[:, 1:] - att[:, :-1])) +
               jnp.mean(jnp.abs(att[:, :, 1:] - att[:, :, :-1])))
    if cfg.lambda_identity > 0:
      same, _, _ = translate(models, params, target, batch[target])
      idt += losses.cycle_loss(same, batch[target], "l1")
    fakes[target] = jax.lax.stop_gradient(seen)
  loss = (adv + cfg.lambda_cycle * cyc + cfg.lambda_identity * idt
          + prior_scale * (cfg.lambda_attention_l1 * att_l1 + cfg.lambda_attention_tv * att_tv))
  metrics.update(g_loss=loss, g_adv=adv, cycle=cyc, attention_tv=att_tv)
  return loss, (fakes, metrics)


def gan_discriminator_loss(dis_params, batch, fakes, *, models, cfg, second=False,
                           att_params=None):
  """Hinge (default) loss of both discriminators on real vs translated images.

  In the second stage a real image of domain t is shown only where the
  attention net that would translate it away (att of the other domain)
  attends; `att_params` holds those nets then.
  """
  loss, metrics = 0.0, {}
  for target in CLASS_KEYS:
    real, fake = batch[target], fakes[target]
    if att_params is not None:
      name = ATT[other(target)]
      att_real = jax.lax.stop_gradient(models[name].apply({"params": att_params[name]}, real))
      real = _attended(real, att_real, second, cfg.attention_threshold)
    b = real.shape[0]
    # One call on [real; fake]: instance norm is per image, so this equals two calls.
    logits = models[DIS[target]].apply({"params": dis_params[DIS[target]]},
                                       jnp.concatenate([real, fake], axis=0))
    l_real = losses.d_loss_real(logits[:b], cfg.adv_loss)
    l_fake = losses.d_loss_fake(logits[b:], cfg.adv_loss)
    loss += l_real + l_fake
    metrics[f"d_real_{target}"] = l_real
    metrics[f"d_fake_{target}"] = l_fake
  metrics["d_loss"] = loss
  return loss, metrics


def gan_grads(state: TrainState, batch, *, models, cfg):
  """Gradients of all six networks from one forward pass of the translations.

  Returns (grads keyed by network, metrics). Generator/attention gradients
  come only from the generator loss, discriminator gradients only from the
  discriminator loss (evaluated at the same, pre-update parameters, like the
  usual alternating update). Every value is a mean over the batch's images,
  so per-shard results average to the whole batch's (gan_train_step).
  """
  gen_params = {n: p for n, p in state.params.items() if not n.startswith("dis_")}
  dis_params = {n: p for n, p in state.params.items() if n.startswith("dis_")}
  second = second_stage(state.step, cfg, cfg.steps)
  (_, (fakes, m_g)), g_grads = jax.value_and_grad(gan_generator_loss, has_aux=True)(
      gen_params, dis_params, batch, models=models, cfg=cfg, second=second,
      prior_scale=attention_prior_scale(state.step, cfg, cfg.steps))
  att_params = ({n: p for n, p in gen_params.items() if n.startswith("att_")}
                if cfg.two_stage_start < 1.0 else None)
  (_, m_d), d_grads = jax.value_and_grad(gan_discriminator_loss, has_aux=True)(
      dis_params, batch, fakes, models=models, cfg=cfg, second=second, att_params=att_params)
  return {**g_grads, **d_grads}, {**m_g, **m_d}


def gan_train_step(state: TrainState, batch, *, models, cfg, mean_over_shards=None):
  """One AG-CycleGAN step updating all six networks (attention frozen in a second stage). Donate `state`.

  `mean_over_shards` (sharding.mean_over_shards bound to a mesh), if given,
  computes gan_grads on each device's shard and averages grads and metrics in
  one all-reduce instead of one per parameter.
  """
  grads_fn = functools.partial(gan_grads, models=models, cfg=cfg)
  if mean_over_shards is not None:
    grads_fn = mean_over_shards(grads_fn)
  grads, metrics = grads_fn(state, batch)
  for name, g in grads.items():
    metrics[f"grad_norm_{name}"] = _global_norm(g)
  new = state.apply_gradients(grads)
  if cfg.two_stage_start < 1.0:
    frozen = second_stage(state.step, cfg, cfg.steps)
    keep = lambda old, upd: jax.tree.map(lambda o, u: jnp.where(frozen, o, u), old, upd)
    params, opt_state = dict(new.params), dict(new.opt_state)
    for name in ATT.values():
      params[name] = keep(state.params[name], new.params[name])
      opt_state[name] = keep(state.opt_state[name], new.opt_state[name])
    new = new.replace(params=params, opt_state=opt_state)
    metrics["second_stage"] = frozen.astype(jnp.float32)
  return new, metrics


def classifier_logits(model, params, images):
  return model.apply({"params": params}, images)


def classifier_train_step(state: TrainState, batch, *, model, class_weights=None):
  """Cross-entropy step of the classifier (network name 'classifier')."""
  def loss_fn(p):
    logits = model.apply({"params": p}, batch["image"])
    return losses.cross_entropy(logits, batch["label"], class_weights), logits
  (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params["classifier"])
  acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
  metrics = {"loss": loss, "accuracy": acc, "grad_norm": _global_norm(g)}
  return state.apply_gradients({"classifier": g}), metrics


def ctr_train_step(state: TrainState, batch, *, model):
  """MSE step of the CTR regressor (network name 'ctr'); batch has 'image', 'ctr' [B]."""
  def loss_fn(p):
    pred = model.apply({"params": p}, batch["image"])[:, 0]
    return jnp.mean((pred - batch["ctr"]) ** 2), pred
  (loss, pred), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params["ctr"])
  metrics = {"loss": loss, "mae": jnp.mean(jnp.abs(pred - batch["ctr"])), "grad_norm": _global_norm(g)}
  return state.apply_gradients({"ctr": g}), metrics
