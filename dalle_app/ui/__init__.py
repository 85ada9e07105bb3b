"""Gradio UI for dalle_app (`build_demo`); the work itself is in `dalle_app.service`."""

from .app import build_demo
from .examples import build_examples, example_prompts
from .handlers import Handlers, progress_html, top_p_value

__all__ = ["Handlers", "build_demo", "build_examples", "example_prompts", "progress_html", "top_p_value"]
