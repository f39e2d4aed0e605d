"""Flax linen networks of the AG-CycleGAN and the classifier."""
from agcg_jax.models.attention import AttentionNet
from agcg_jax.models.classifier import Classifier
from agcg_jax.models.discriminator import PatchDiscriminator
from agcg_jax.models.generator import ResnetGenerator

__all__ = ["AttentionNet", "Classifier", "PatchDiscriminator", "ResnetGenerator"]
