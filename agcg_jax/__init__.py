"""agcg-jax: explaining a chest X-ray classifier with an Attention-Guided CycleGAN."""

__version__ = "0.1.0"
