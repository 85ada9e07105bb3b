"""Sampling engine: fast, reproducible generation on top of `dalle_app.models` (no UI; its one file I/O is the
build cache of the compiled CPU step, `cpu_step`)."""

from .generate import ImageTokens, Progress, TextTokens, complete_text, generate_image_tokens
from .memory import estimate_request_bytes, generate_in_chunks
from .sampling import SamplingOptions, filter_logits, guide, sample, uniform_noise

__all__ = ["ImageTokens", "Progress", "SamplingOptions", "TextTokens", "complete_text", "estimate_request_bytes", "filter_logits", "generate_in_chunks",
           "generate_image_tokens", "guide", "sample", "uniform_noise"]
