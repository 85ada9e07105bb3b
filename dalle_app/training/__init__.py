"""Training of the built-in shapes model: `python -m dalle_app.training --out weights/shapes-dalle`.

    from dalle_app.training import Trainer, TrainConfig, quick_config
"""

from .config import RECIPES, TrainConfig, quick_config, v2_config
from .train import TOKENIZER_FILE, Trainer, psnr

__all__ = ["RECIPES", "TOKENIZER_FILE", "TrainConfig", "Trainer", "psnr", "quick_config", "v2_config"]
