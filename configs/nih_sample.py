"""Real radiographs on this CPU: train on 4,271 NIH images, score on the NIH sample's expert boxes.

    agcg demo --config configs/nih_sample.py --workdir runs/nih_sample

Trains the classifier and the AG-CycleGAN on ../shared/nih_cm128 (class
folders `true/` = Cardiomegaly, `false/` = no Cardiomegaly (No Finding or
other findings), 128 px, used at 64 px), histogram-equalised at conversion;
scores the run on ../shared/nih_sample (the NIH release's layout; the official
split puts every expert box in the test set), prepared with the same
equalisation. Any NIH-layout or class-folder set works: change
data.folders.source (or data.kind) and eval_data.nih.source.

The demo's networks (configs/demo.py) and attention priors; docs/benchmarks.md
records what each option tried gave on the sample's 73 boxes.
"""
from agcg_jax.config import base


def get_config(arg=None):
  c = base()
  c.data.kind = "folders"
  c.data.image_size = 64
  f = c.data.folders
  f.source = "../shared/nih_cm128"
  f.no_finding = "false"
  f.cardiomegaly = "true"
  f.normalize = "equalize"
  f.test_fraction = 0.2

  c.eval_data.kind = "nih"
  n = c.eval_data.nih
  n.source = "../shared/nih_sample"
  n.split = "official"
  n.balance = "none"
  n.normalize = "equalize"

  c.model.gen_width = 8
  c.model.gen_res = 3
  c.model.att_width = 8
  c.model.dis_width = 8
  c.model.cls_width = 16

  c.classifier.steps = 600
  c.classifier.log_every = 50
  c.classifier.ckpt_every = 300
  c.classifier.batch_per_device = 16

  c.gan.batch_per_device = 4
  c.gan.steps = 3000
  c.gan.lambda_attention_l1 = 10.0
  c.gan.lambda_attention_tv = 10.0
  c.gan.log_every = 50
  c.gan.ckpt_every = 500
  c.eval.audit_images = 3416
  if arg:
    raise ValueError(f"unknown variant {arg!r}: use configs/nih_sample.py")
  return c
