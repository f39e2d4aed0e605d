"""The train state: one pytree keyed by network name, one Optax state per network."""
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from agcg_jax.data.records import CLASS_KEYS, NUM_CLASSES
from agcg_jax import models as M
from agcg_jax.errors import UserError
from agcg_jax.models import conv_rewrites

# The six AG-CycleGAN networks. Translation *into* domain t uses gen_t and
# att_t; dis_t judges whether an image looks like domain t.
GEN = {k: f"gen_{k}" for k in CLASS_KEYS}
ATT = {k: f"att_{k}" for k in CLASS_KEYS}
DIS = {k: f"dis_{k}" for k in CLASS_KEYS}
GAN_NETS = tuple(GEN.values()) + tuple(ATT.values()) + tuple(DIS.values())


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params / opt_state: dicts keyed by network name.

  The optimisers are static fields, not leaves: they are code, not data, and
  are rebuilt from the config on restore.
  """
  step: jnp.ndarray
  params: dict[str, Any]
  opt_state: dict[str, Any]
  txs: Mapping[str, optax.GradientTransformation] = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: Mapping[str, Any]) -> "TrainState":
    """Adam step for each network that has gradients; the others are kept as they are."""
    params, opt_state = dict(self.params), dict(self.opt_state)
    for name, g in grads.items():
      updates, opt_state[name] = self.txs[name].update(g, self.opt_state[name], self.params[name])
      params[name] = optax.apply_updates(self.params[name], updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def adam(lr: float, b1: float, b2: float, total_steps: int, decay_start: float) -> optax.GradientTransformation:
  """Adam(b1, b2) with a constant rate, then linear decay to 0 from `decay_start` (a fraction of the run; >= 1 disables)."""
  if decay_start >= 1.0 or total_steps <= 0:
    schedule = lr
  else:
    start = int(total_steps * decay_start)
    schedule = optax.join_schedules(
        [optax.constant_schedule(lr),
         optax.linear_schedule(lr, 0.0, max(total_steps - start, 1))], [start])
  return optax.adam(schedule, b1=b1, b2=b2)


def compute_dtype(name: str):
  if name in ("float32", "fp32"):
    return jnp.float32
  if name in ("bfloat16", "bf16"):
    return jnp.bfloat16
  raise UserError(f"--config.model.dtype must be 'float32' or 'bfloat16', got {name!r}")


def gan_models(model_cfg) -> dict[str, nn.Module]:
  """The six networks from config.model, keyed like GAN_NETS."""
  dtype = compute_dtype(model_cfg.dtype)
  rewrite = conv_rewrites.resolve(model_cfg.get("conv_rewrites", "auto"))
  out = {}
  for k in CLASS_KEYS:
    out[GEN[k]] = M.ResnetGenerator(
        width=model_cfg.gen_width, num_down=model_cfg.gen_down, num_res=model_cfg.gen_res,
        upsample=model_cfg.gen_upsample, padding=model_cfg.padding, dtype=dtype,
        rewrite=rewrite)
    out[ATT[k]] = M.AttentionNet(
        width=model_cfg.att_width, dilations=tuple(model_cfg.att_dilations),
        padding=model_cfg.padding, dtype=dtype, rewrite=rewrite)
    out[DIS[k]] = M.PatchDiscriminator(
        width=model_cfg.dis_width, num_layers=model_cfg.dis_layers,
        sigmoid=model_cfg.dis_sigmoid, dtype=dtype)
  return out


def gan_txs(gan_cfg) -> dict[str, optax.GradientTransformation]:
  """One Adam per network with the paper's rates (D 4e-4, G and A 1e-4)."""
  lr = {"gen": gan_cfg.lr_g, "att": gan_cfg.lr_a, "dis": gan_cfg.lr_d}
  return {n: adam(lr[n.split("_")[0]], gan_cfg.b1, gan_cfg.b2, gan_cfg.steps, gan_cfg.decay_start)
          for n in GAN_NETS}


def make_init_fn(models: Mapping[str, nn.Module], txs, image_shape) -> Callable[[jax.Array], TrainState]:
  """init(key) -> TrainState; pure, so it can be eval_shape'd and jitted with out_shardings."""
  def init(key):
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    keys = jax.random.split(key, len(models))
    params = {name: m.init(k, dummy)["params"] for k, (name, m) in zip(keys, sorted(models.items()))}
    opt_state = {name: txs[name].init(p) for name, p in params.items()}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, txs=txs)
  return init


def image_shape(config) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, 1)


def classifier_model(config) -> M.Classifier:
  norm = config.model.cls_norm
  if norm not in ("instance", "none"):
    raise UserError(f"--config.model.cls_norm={norm!r}: use 'instance' or 'none'")
  return M.Classifier(width=config.model.cls_width, num_layers=config.model.cls_layers,
                      num_classes=NUM_CLASSES, dtype=compute_dtype(config.model.dtype),
                      norm=norm == "instance")


def ctr_model(config) -> M.Classifier:
  # The classifier's architecture with one output: a regressor of the CTR.
  return M.Classifier(width=config.ctr.width, num_layers=config.ctr.layers,
                      num_classes=1, dtype=compute_dtype(config.model.dtype))


def classifier_init_fn(config):
  c = config.classifier
  tx = {"classifier": adam(c.lr, c.b1, c.b2, c.steps, c.decay_start)}
  return make_init_fn({"classifier": classifier_model(config)}, tx, image_shape(config))


def ctr_init_fn(config):
  c = config.ctr
  tx = {"ctr": adam(c.lr, 0.9, 0.999, c.steps, 0.7)}
  return make_init_fn({"ctr": ctr_model(config)}, tx, image_shape(config))


def gan_init_fn(config):
  return make_init_fn(gan_models(config.model), gan_txs(config.gan), image_shape(config))
