"""The CPU demo: the whole explanation job on built-in phantoms, sized for a 2-core laptop.

    agcg demo --config configs/demo.py --workdir runs/demo

(`bash launch/demo.sh` runs exactly that after setting up.) The variant
`configs/demo.py:tiny` is the test suite's smoke run (seconds, not results).
"""
from agcg_jax.config import base


def get_config(arg=None):
  c = base()
  c.data.image_size = 64
  c.data.num_train = 2000
  c.data.num_test = 400

  c.model.gen_width = 8
  c.model.gen_res = 3
  c.model.att_width = 8
  c.model.dis_width = 8
  c.model.cls_width = 16

  c.classifier.steps = 400
  c.classifier.log_every = 20
  c.classifier.ckpt_every = 200

  c.gan.batch_per_device = 4
  c.gan.steps = 2000
  # Not in the paper: L1 + total-variation priors on the attention maps (as
  # GANimation's). Scored against the counterfactual twins (2026-11-28, same
  # classifier, 2,000 GAN steps; docs/benchmarks.md): L1 1 / TV 0 gives
  # attention truth enrichment 6.2 and counterfactual error 0.70 (the diffuse
  # attention leaks the generator's output everywhere); L1 3 / TV 3 9.6, 0.46;
  # L1 5 / TV 5 11.5, 0.38; L1 10 / TV 10 13.2, 0.31. Flips and CTR directions
  # stay at 100% throughout.
  c.gan.lambda_attention_l1 = 10.0
  c.gan.lambda_attention_tv = 10.0
  c.gan.log_every = 25
  c.gan.ckpt_every = 500

  c.ctr.steps = 600
  c.ctr.width = 16
  c.ctr.log_every = 50

  if arg == "tiny":
    c.data.image_size = 32
    c.data.num_train = 32
    c.data.num_test = 16
    c.model.gen_width = 4
    c.model.gen_res = 1
    c.model.att_width = 4
    c.model.att_dilations = (1, 2)
    c.model.dis_width = 4
    c.model.dis_layers = 2
    c.model.cls_width = 4
    c.model.cls_layers = 2
    c.classifier.batch_per_device = 4
    c.classifier.steps = 6
    c.classifier.log_every = 2
    c.classifier.ckpt_every = 3
    c.gan.batch_per_device = 2
    c.gan.steps = 6
    c.gan.log_every = 2
    c.gan.ckpt_every = 3
    c.ctr.steps = 6
    c.ctr.width = 4
    c.ctr.layers = 2
    c.ctr.batch_per_device = 4
    c.ctr.log_every = 2
    c.eval.batch_size = 8
    c.eval.num_figure_examples = 2
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use configs/demo.py or configs/demo.py:tiny")
  return c
