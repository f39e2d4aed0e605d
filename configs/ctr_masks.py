"""Real hearts with known outlines: the explanation scored against drawn hearts, on this CPU.

    agcg demo --config configs/ctr_masks.py --workdir runs/ctr

Recipe (issue 8): the classifier and the AG-CycleGAN learn Cardiomegaly vs
not from 4,271 real NIH radiographs (../shared/nih_cm128, class folders,
histogram-equalised); they are scored on the held-out quarter of
../shared/ctr_wingspan (259 PA radiographs with drawn heart and lung masks,
label CTR > 0.5, equalised the same way), whose other three quarters train
the heart-and-lung segmenter that measures the CTR of translated images.
194 outlined images alone are too few to train the translation (issue 8's
first try: attention border enrichment 1.2, under the fixed prior's 3.4).

`configs/ctr_masks.py:alone` trains everything on the outlined set itself.
Any folder laid out as png/ + mask/{heart,left_lung,right_lung}/ works:
--config.eval_data.ctr_masks.source=DIR.
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

  c.eval_data.kind = "ctr_masks"
  c.eval_data.ctr_masks.source = "../shared/ctr_wingspan"
  c.eval_data.ctr_masks.normalize = "equalize"

  c.model.gen_width = 8
  c.model.gen_res = 3
  c.model.att_width = 8
  c.model.dis_width = 8
  c.model.cls_width = 16

  c.classifier.steps = 600
  c.classifier.batch_per_device = 16
  c.classifier.log_every = 50
  c.classifier.ckpt_every = 300

  c.gan.batch_per_device = 4
  c.gan.steps = 3000
  c.gan.lambda_attention_l1 = 10.0
  c.gan.lambda_attention_tv = 10.0
  c.gan.log_every = 50
  c.gan.ckpt_every = 500

  c.segmenter.steps = 1000
  c.eval.audit_images = 3416
  if arg == "alone":
    c.data.kind = "ctr_masks"
    c.data.ctr_masks = c.eval_data.ctr_masks
    c.eval_data.kind = ""
    c.classifier.steps = 400
    c.gan.steps = 2000
    c.eval.audit_images = 2000
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use configs/ctr_masks.py or :alone")
  return c
