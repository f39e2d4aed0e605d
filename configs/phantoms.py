"""Full-size AG-CycleGAN on phantoms (256x256, the paper's networks and rates): a GPU/TPU run.

    agcg demo --config configs/phantoms.py --workdir runs/phantoms256
    agcg bench --config configs/phantoms.py --size 256 --batch 1 8 --dtype fp32 bf16

Variants: `configs/phantoms.py:bf16` computes in bfloat16 (parameters and
Adam states stay float32).
"""
from agcg_jax.config import base


def get_config(arg=None):
  c = base()
  c.data.image_size = 256
  c.data.num_train = 4000
  c.data.num_test = 1000
  c.gan.steps = 40000
  c.classifier.steps = 3000
  c.ctr.steps = 3000
  if arg == "bf16":
    c.model.dtype = "bfloat16"
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use configs/phantoms.py or configs/phantoms.py:bf16")
  return c
