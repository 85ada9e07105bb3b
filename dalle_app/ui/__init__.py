"""Gradio UI for dalle_app (`build_demo`); the work itself is in `dalle_app.service`."""

from .app import build_demo, example_prompts

__all__ = ["build_demo", "example_prompts"]
