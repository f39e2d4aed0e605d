"""The AG-CycleGAN and classifier steps: what they update, tracing, sharding, CAM."""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agcg_jax import cam as cam_lib
from agcg_jax import sharding as sh
from agcg_jax import state as S
from agcg_jax import steps
from agcg_jax.data.records import CLASS_KEYS


def _batch(b, s, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.uniform(-1, 1, (b, s, s, 1)), jnp.float32) for k in CLASS_KEYS}


def _gan(config, **gan_overrides):
  g = config.gan.copy_and_resolve_references()
  for k, v in gan_overrides.items():
    g[k] = v
  models = S.gan_models(config.model)
  init = S.make_init_fn(models, S.gan_txs(g), S.image_shape(config))
  state = jax.jit(init)(jax.random.PRNGKey(0))
  return models, g, state


def _changed(a, b):
  return {n: not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a[n]), jax.tree.leaves(b[n])))
          for n in a}


def test_translate_is_equ_8(tiny_config):
  """fake = A_t(x) * G_t(x) + (1 - A_t(x)) * x (paper Equ. 8), with A_t and G_t the
  target's own networks applied on their own; on this input the roles swapped
  (A * x + (1 - A) * G) would differ clearly, so the test tells the two apart."""
  models, _, state = _gan(tiny_config)
  batch = _batch(2, tiny_config.data.image_size, seed=3)
  for t in CLASS_KEYS:
    x = batch[steps.other(t)]
    a = models[S.ATT[t]].apply({"params": state.params[S.ATT[t]]}, x)
    gen = models[S.GEN[t]].apply({"params": state.params[S.GEN[t]]}, x)
    fake, att, generated = steps.translate(models, state.params, t, x)
    np.testing.assert_allclose(att, a, atol=1e-6)
    np.testing.assert_allclose(generated, gen, atol=1e-6)
    np.testing.assert_allclose(fake, a * gen + (1 - a) * x, atol=1e-6)
    # Discriminating power: the swapped formula, G alone and the other target's
    # networks are all far from Equ. 8 here (mean |diff| over 0.05, vs 1e-6).
    assert float(jnp.mean(jnp.abs((a * x + (1 - a) * gen) - fake))) > 0.05
    assert float(jnp.mean(jnp.abs(gen - fake))) > 0.05
    other_fake = steps.translate(models, state.params, steps.other(t), x)[0]
    assert float(jnp.mean(jnp.abs(other_fake - fake))) > 0.05


def test_gradient_steps_move_discriminator_logits_the_right_way(tiny_config):
  """The adversarial game has the right signs, measured with the networks, not losses.

  Adversarial loss only (cycle, identity and attention priors off): a small
  plain gradient-descent step on G and A raises D_t's mean raw logit on the new
  translations into t, for both t (G fools D); a step on D, with the fakes
  fixed, raises mean D_t(real) - mean D_t(fake) (D tells them apart). Each rise
  is a sizeable part of its first-order prediction eta * |grad|^2.
  """
  models, g, state = _gan(tiny_config, lambda_cycle=0.0, lambda_identity=0.0,
                          lambda_attention_l1=0.0, lambda_attention_tv=0.0)
  assert g.adv_loss == "hinge" and g.two_stage_start >= 1.0
  batch = _batch(4, tiny_config.data.image_size, seed=1)
  grads, _ = jax.jit(functools.partial(steps.gan_grads, models=models, cfg=g))(state, batch)
  p0 = state.params

  @jax.jit
  def measure(params, fakes=None):
    """Per target: (fake, mean D_t(fake), mean D_t(real)) with D_t = params' dis_t."""
    out = {}
    for t in CLASS_KEYS:
      fake = steps.translate(models, params, t, batch[steps.other(t)])[0] if fakes is None else fakes[t]
      d = lambda x: jnp.mean(models[S.DIS[t]].apply({"params": params[S.DIS[t]]}, x))
      out[t] = (fake, d(fake), d(batch[t]))
    return out

  def sq(names):
    return sum(float(jnp.sum(x ** 2)) for n in names for x in jax.tree.leaves(grads[n]))

  def descend(names, eta):
    return {**p0, **{n: jax.tree.map(lambda p, d: p - eta * d, p0[n], grads[n]) for n in names}}

  before = measure(p0)
  fakes0 = {t: v[0] for t, v in before.items()}
  # Generators and attention: eta sized for a first-order rise of 0.02 in all.
  gen_names = [n for n in p0 if not n.startswith("dis_")]
  eta = 0.02 / sq(gen_names)
  after = measure(descend(gen_names, eta))
  for t in CLASS_KEYS:
    rise = float(after[t][1] - before[t][1])
    # -mean D is G's whole hinge loss, so the rise is close to first order (measured 0.97).
    assert rise > 0.5 * eta * sq([S.GEN[t], S.ATT[t]]), (t, rise)
  # Discriminators, on the fakes of the parameters before the step.
  dis_names = [n for n in p0 if n.startswith("dis_")]
  eta = 0.02 / sq(dis_names)
  after = measure(descend(dis_names, eta), fakes0)
  for t in CLASS_KEYS:
    rise = float((after[t][2] - after[t][1]) - (before[t][2] - before[t][1]))
    # Patches past the hinge margins carry no gradient, so the mean margin rises
    # less than the loss falls (measured 0.2 and 0.9 of first order); float
    # noise in these means is ~1e-6.
    assert rise > 0.1 * eta * sq([S.DIS[t]]), (t, rise)


def _split(params):
  """(generator + attention params, discriminator params)."""
  return ({n: p for n, p in params.items() if not n.startswith("dis_")},
          {n: p for n, p in params.items() if n.startswith("dis_")})


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _adam(state, name, grad):
  """The parameters of network `name` after its own optimiser's step on `grad`."""
  upd, _ = state.txs[name].update(grad, state.opt_state[name], state.params[name])
  return optax.apply_updates(state.params[name], upd)


def test_each_network_is_updated_by_adam_on_its_own_loss_only(tiny_config):
  """With every learning rate non-zero, one gan_train_step moves G and A by Adam on
  the gradient of the generator loss alone and D by Adam on the gradient of the
  discriminator loss alone (fakes held fixed), each with its own rate.

  The discriminator update leaves the generators alone (and the reverse): a D
  loss leaking into G (e.g. both losses differentiated together) or G's loss
  into D would move the parameters measurably elsewhere, which is checked too.
  """
  models, g, state = _gan(tiny_config)
  assert min(g.lr_g, g.lr_a, g.lr_d) > 0 and g.lr_d != g.lr_g
  batch = _batch(2, tiny_config.data.image_size)
  gen, dis = _split(state.params)
  kw = dict(models=models, cfg=g)

  @jax.jit
  def reference(gen, dis):
    g_loss = lambda gp, dp: steps.gan_generator_loss(gp, dp, batch, **kw)
    want_g = jax.grad(lambda gp: g_loss(gp, dis)[0])(gen)
    fakes = g_loss(gen, dis)[1][0]  # stop_gradient'ed
    want_d = jax.grad(lambda dp: steps.gan_discriminator_loss(dp, batch, fakes, **kw)[0])(dis)
    # The leaks the step must not have: G's loss reaching D, and D's loss
    # reaching G through fakes that are not stop_gradient'ed.
    leak_d = jax.grad(lambda dp: g_loss(gen, dp)[0])(dis)
    leak_g = jax.grad(lambda gp: steps.gan_discriminator_loss(
        dis, batch, {t: steps.translate(models, gp, t, batch[steps.other(t)])[0]
                     for t in CLASS_KEYS}, **kw)[0])(gen)
    # The fakes the generator loss hands to D are stop_gradient'ed: the D loss
    # computed on them has no gradient into G and A.
    through_fakes = jax.grad(lambda gp: steps.gan_discriminator_loss(
        dis, batch, g_loss(gp, dis)[1][0], **kw)[0])(gen)
    return {**want_g, **want_d}, {**leak_g, **leak_d}, through_fakes

  want, leak, through_fakes = reference(gen, dis)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(through_fakes))
  assert all(float(jnp.max(jnp.abs(x))) > 0.0 for n in gen for x in jax.tree.leaves(leak[n])[:1])
  got, _ = jax.jit(functools.partial(steps.gan_grads, **kw))(state, batch)
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6 * scale)

  new, _ = jax.jit(functools.partial(steps.gan_train_step, **kw))(state, batch)
  new = jax.device_get(new.params)
  lr = {"gen": g.lr_g, "att": g.lr_a, "dis": g.lr_d}
  for name in S.GAN_NETS:
    rate = lr[name.split("_")[0]]
    tol = 1e-3 * rate
    assert _max_abs_diff(new[name], _adam(state, name, want[name])) <= tol, name
    # Detectable: the leaky gradient would have moved this network elsewhere.
    leaky = jax.tree.map(jnp.add, want[name], leak[name])
    assert _max_abs_diff(_adam(state, name, leaky), _adam(state, name, want[name])) > 100 * tol, name
    # ... and its own rate: Adam's first step moves the largest weight by about lr.
    moved = _max_abs_diff(new[name], state.params[name])
    assert 0.5 * rate < moved <= 1.01 * rate, (name, moved, rate)


def test_gan_step_compiles_once(tiny_config):
  models, g, state = _gan(tiny_config)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(st, b):
    return steps.gan_train_step(st, b, models=models, cfg=g)
  for i in range(3):
    state, m = step(state, _batch(2, tiny_config.data.image_size, seed=i))
  assert int(state.step) == 3
  assert np.isfinite(float(m["g_loss"])) and np.isfinite(float(m["d_loss"]))


def test_step_sharded_over_8_devices_equals_single_device(tiny_config, one_device_mesh):
  """Same global batch on 1 and on 8 devices: same gradients, losses and parameters.

  Gradients and losses are compared tightly. Parameters after Adam are
  compared to within a fraction of one step's size: Adam's first steps move
  a parameter by about lr * sign(g) whatever |g| is, so a gradient that is
  zero up to rounding (it differs with the reduction order) may move either
  way by up to lr.
  """
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  models, g, state0 = _gan(tiny_config)
  s = tiny_config.data.image_size
  batches = [_batch(8, s, seed=i) for i in range(2)]
  grads, metrics, params = [], [], []
  for mesh in (one_device_mesh, sh.data_mesh()):
    rep = sh.replicated(mesh)
    shardings = jax.tree.map(lambda _: rep, state0)
    state = jax.device_put(state0, rep)
    grad_fn = jax.jit(functools.partial(steps.gan_grads, models=models, cfg=g), out_shardings=rep)
    # What training runs: per-shard gradients averaged in one all-reduce.
    mean = functools.partial(sh.mean_over_shards, mesh=mesh)
    step = jax.jit(functools.partial(steps.gan_train_step, models=models, cfg=g, mean_over_shards=mean),
                   out_shardings=(shardings, rep))
    gr, m = grad_fn(state, jax.device_put(batches[0], sh.batch_sharded(mesh)))
    grads.append(jax.device_get(gr))
    metrics.append(jax.device_get(m))
    gr, m = jax.jit(mean(functools.partial(steps.gan_grads, models=models, cfg=g)), out_shardings=rep)(
        state, jax.device_put(batches[0], sh.batch_sharded(mesh)))
    grads.append(jax.device_get(gr))
    metrics.append(jax.device_get(m))
    for b in batches:
      state, _ = step(state, jax.device_put(b, sh.batch_sharded(mesh)))
    assert all(x.sharding.is_equivalent_to(rep, x.ndim) for x in jax.tree.leaves(state.params))
    params.append(jax.device_get(state.params))
  # grads/metrics: [1 device plain, 1 device mean_over_shards, 8 devices plain, 8 devices one all-reduce]
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(grads[0]))
  for i in (1, 2, 3):
    chex.assert_trees_all_close(metrics[0], metrics[i], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(grads[0], grads[i], rtol=1e-3, atol=1e-5 * scale)
  chex.assert_trees_all_close(params[0], params[1], atol=2 * max(g.lr_d, g.lr_g, g.lr_a))
  # ... and the parameters did move by much more than that tolerance.
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(jax.device_get(state0.params)), jax.tree.leaves(params[0])))
  assert moved >= 2 * g.lr_d


def test_attention_prior_ramp(tiny_config):
  """The priors' factor grows from attention_prior_start to 1 over the ramp, and scales their loss terms."""
  _, g, _ = _gan(tiny_config, steps=100, attention_prior_start=0.3, attention_prior_ramp=0.5)
  scale = lambda step: float(steps.attention_prior_scale(jnp.asarray(step), g, g.steps))
  np.testing.assert_allclose([scale(0), scale(25), scale(50), scale(99)], [0.3, 0.65, 1.0, 1.0],
                             rtol=1e-6)
  _, g_const, _ = _gan(tiny_config, steps=100)
  assert float(steps.attention_prior_scale(jnp.asarray(0), g_const, 100)) == 1.0
  models, g, state = _gan(tiny_config, lambda_attention_l1=2.0, lambda_attention_tv=3.0)
  gen = {n: p for n, p in state.params.items() if not n.startswith("dis_")}
  dis = {n: p for n, p in state.params.items() if n.startswith("dis_")}
  batch = _batch(2, tiny_config.data.image_size)
  loss = lambda s: float(steps.gan_generator_loss(gen, dis, batch, models=models, cfg=g,
                                                  prior_scale=s)[0])
  _, (_, m) = steps.gan_generator_loss(gen, dis, batch, models=models, cfg=g)
  att_l1 = sum(float(m[f"attention_mean_{t}"]) for t in CLASS_KEYS)
  priors = 2.0 * att_l1 + 3.0 * float(m["attention_tv"])
  np.testing.assert_allclose(loss(1.0) - loss(0.0), priors, rtol=1e-4)
  np.testing.assert_allclose(loss(0.3) - loss(0.0), 0.3 * priors, rtol=1e-4)
  # With a target amount the L1 term is each image's distance from it (losses.attention_amount).
  models, g, _ = _gan(tiny_config, lambda_attention_l1=2.0, lambda_attention_tv=0.0, attention_target=0.9)
  _, (_, m) = steps.gan_generator_loss(gen, dis, batch, models=models, cfg=g)
  assert all(float(m[f"attention_mean_{t}"]) < 0.9 for t in CLASS_KEYS)
  np.testing.assert_allclose(loss(1.0) - loss(0.0),
                             2.0 * sum(0.9 - float(m[f"attention_mean_{t}"]) for t in CLASS_KEYS),
                             rtol=1e-4)


def test_sharded_step_reduces_in_one_all_reduce(tiny_config):
  """Over 8 devices the GAN step averages all gradients and metrics in a single all-reduce.

  One per parameter (what plain jit gives) costs ~4 ms each with the CPU's
  gloo collectives across processes: sharding.mean_over_shards.
  """
  models, g, state0 = _gan(tiny_config)
  mesh = sh.data_mesh()
  rep = sh.replicated(mesh)
  batch = jax.device_put(_batch(8, tiny_config.data.image_size), sh.batch_sharded(mesh))
  state = jax.device_put(state0, rep)
  counts = []
  for mean in (None, functools.partial(sh.mean_over_shards, mesh=mesh)):
    step = jax.jit(functools.partial(steps.gan_train_step, models=models, cfg=g, mean_over_shards=mean),
                   out_shardings=(jax.tree.map(lambda _: rep, state0), rep))
    hlo = step.lower(state, batch).compile().as_text()
    # Each all-reduce instruction, and each array it reduces (a tuple all-reduce has many).
    ops = [m.group(1) for m in map(re.compile(r"= (.*) all-reduce(?:-start)?\(").search,
                                   hlo.splitlines()) if m]
    counts.append((len(ops), sum(len(re.findall(r"\b[a-z]+\d*\[", op)) for op in ops)))
  plain, one = counts
  assert one == (1, 1), counts
  assert plain[1] > 10, counts  # the per-parameter reduction this replaces


def test_cam_identity(tiny_config):
  """Spatial mean of class c's CAM plus c's bias equals c's logit (paper Equ. 9 with GAP)."""
  model = S.classifier_model(tiny_config)
  s = tiny_config.data.image_size
  x = _batch(3, s)[CLASS_KEYS[0]]
  params = model.init(jax.random.PRNGKey(3), x)["params"]
  # A non-zero bias, so the identity is tested with it.
  params = jax.tree_util.tree_map(lambda p: p, params)
  params["head"]["bias"] = jnp.array([0.3, -0.7])
  logits, cams = jax.jit(functools.partial(cam_lib.logits_and_cam, model))(params, x)
  chex.assert_rank(cams, 4)
  recon = jnp.mean(cams, axis=(1, 2)) + params["head"]["bias"]
  np.testing.assert_allclose(recon, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, model.apply({"params": params}, x), rtol=1e-6, atol=1e-6)


def test_classifier_step_learns_a_separable_problem(tiny_config, one_device_mesh):
  """Class 1 is bright on the left, class 0 on the right (instance norm would
  erase a plain brightness offset, so the classes differ in *where*)."""
  model = S.classifier_model(tiny_config)
  init = S.classifier_init_fn(tiny_config)
  state = jax.jit(init)(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  s = tiny_config.data.image_size

  def batch(n):
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.2, (n, s, s, 1))
    left = np.arange(s)[None, None, :, None] < s // 2
    x += np.where((y[:, None, None, None] == 1) == left, 0.6, -0.6)
    return {"image": jnp.asarray(x, jnp.float32), "label": jnp.asarray(y, jnp.int32)}
  step = jax.jit(functools.partial(steps.classifier_train_step, model=model))
  for _ in range(40):
    state, m = step(state, batch(8))
  held_out = batch(64)
  logits = model.apply({"params": state.params["classifier"]}, held_out["image"])
  assert float(jnp.mean(jnp.argmax(logits, -1) == held_out["label"])) >= 0.9


def test_bf16_gan_step_keeps_fp32_parameters_and_states(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.model.dtype = "bfloat16"
  models, g, state = _gan(config)
  state, m = jax.jit(functools.partial(steps.gan_train_step, models=models, cfg=g))(
      state, _batch(2, config.data.image_size))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.opt_state))
  assert np.isfinite(float(m["g_loss"])) and np.isfinite(float(m["d_loss"]))


def test_second_stage_freezes_attention_and_masks_what_the_discriminator_sees(tiny_config):
  """Original AG-CycleGAN option: from `two_stage_start` on, attention nets stop moving."""
  models, g, state = _gan(tiny_config, two_stage_start=0.5)  # steps=6: stage 2 from step 3
  step = jax.jit(functools.partial(steps.gan_train_step, models=models, cfg=g))
  history = []
  for i in range(5):
    before = jax.device_get(state.params)
    state, m = step(state, _batch(2, tiny_config.data.image_size, seed=i))
    history.append((_changed(before, jax.device_get(state.params)), float(m["second_stage"])))
  for i, (changed, second) in enumerate(history):
    assert second == (1.0 if i >= 3 else 0.0)
    assert all(changed[S.GEN[k]] and changed[S.DIS[k]] for k in CLASS_KEYS)
    assert all(changed[S.ATT[k]] == (i < 3) for k in CLASS_KEYS), i
  # In the second stage the discriminators see only attended pixels.
  gen = {n: p for n, p in state.params.items() if not n.startswith("dis_")}
  dis = {n: p for n, p in state.params.items() if n.startswith("dis_")}
  batch = _batch(2, tiny_config.data.image_size)
  _, (fakes, _) = steps.gan_generator_loss(gen, dis, batch, models=models, cfg=g, second=True)
  for k in CLASS_KEYS:
    _, att, _ = steps.translate(models, state.params, k, batch[steps.other(k)])
    assert np.all(np.asarray(fakes[k])[np.asarray(att) <= g.attention_threshold] == 0.0)
