"""dalle_app: run DALLE-pytorch family models (discrete VAE + transformer + CLIP) interactively."""

__version__ = "0.1.0"
