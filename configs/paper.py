"""The paper's experiment on NIH ChestX-ray14: 256x256, batch 1 GAN / 8 classifier,
lr D 4e-4, G and A 1e-4, classifier 3.2e-3, Adam(0.5, 0.9), the paper's cohort
(random 80/20 by image, training set balanced to 2,220 + 2,220, test set whole).

Each step on a downloaded release at $NIH (NIH layout or Kaggle's):

    agcg prepare          --config configs/paper.py --workdir runs/paper --config.data.nih.source=$NIH
    agcg train-classifier --config configs/paper.py --workdir runs/paper
    agcg train-gan        --config configs/paper.py --workdir runs/paper
    agcg evaluate         --config configs/paper.py --workdir runs/paper
    agcg explain          --config configs/paper.py --workdir runs/paper

The cohort options live in `data.nih` and name the prepared dataset
(data/nih/nih_chest_xray14/size256_both_paper_undersample_seed0/): a config
always trains on the cohort it describes. `configs/paper.py:patient` is the
same with a patient-disjoint split (prepare it with the same config).
The paper gives no epoch counts: 4,440 training images, so gan.steps=200000
is 45 epochs at batch 1; classifier.steps=5550 is 10 epochs at batch 8.
"""
from agcg_jax.config import base


def get_config(arg=None):
  c = base()
  c.data.kind = "nih"
  c.data.dir = "data/nih"
  c.data.image_size = 256
  c.data.workers = 0
  c.data.nih.split = "paper"
  c.data.nih.balance = "undersample"
  c.classifier.batch_per_device = 8
  c.classifier.steps = 5550
  c.gan.batch_per_device = 1
  c.gan.steps = 200000
  c.gan.log_every = 200
  c.gan.ckpt_every = 5000
  c.eval.batch_size = 32
  if arg == "patient":
    c.data.nih.split = "patient"
  elif arg == "bf16":
    c.model.dtype = "bfloat16"
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use configs/paper.py, :patient or :bf16")
  return c
