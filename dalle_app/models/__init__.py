"""Pure networks of the DALLE-pytorch family (no file, Hub or UI code here)."""

from .clip import CLIP
from .dalle import DALLE
from .openai_dvae import OpenAIDiscreteVAE
from .transformer import InferenceCache, Transformer
from .vae import DiscreteVAE
from .vqgan import VQGanConfig, VQGanVAE

__all__ = ["CLIP", "DALLE", "DiscreteVAE", "InferenceCache", "OpenAIDiscreteVAE", "Transformer", "VQGanConfig",
           "VQGanVAE"]
