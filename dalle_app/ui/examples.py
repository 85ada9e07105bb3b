"""One-click examples for the four tabs, drawn from the shapes world the built-in model was trained on.

Scenes are rendered once at start-up (a few milliseconds each) into a folder the app serves, so no binary example
files ship with the package and no example is run (cached) at launch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExampleSet:
    """Rows for each tab's gr.Examples (each row matches that tab's example inputs, in order)."""

    text_to_image: list[list] = field(default_factory=list)  # [prompt, seed]
    priming: list[list] = field(default_factory=list)        # [image path, prompt, keep_rows, seed]
    reconstruction: list[list] = field(default_factory=list)  # [image path]
    completion: list[list] = field(default_factory=list)     # [prefix, seed]


def example_prompts(count: int = 6, seed: int = 0) -> list[str]:
    """Captions from the shapes world (what the built-in model was trained on)."""
    from ..world import caption, sample_scene

    rng = random.Random(seed)
    return [caption(sample_scene(rng), rng) for _ in range(count)]


def build_examples(folder: str | Path, *, token_rows: int = 16, count: int = 4, seed: int = 0) -> ExampleSet:
    """Render `count` world scenes as PNGs under `folder` and build the example rows of every tab.

    `token_rows` is the model's token grid side: priming examples keep the top half of it."""
    from ..world import caption, render, sample_scene

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    examples = ExampleSet()
    for i in range(count):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        path = folder / f"example-{i}.png"
        render(scene, rng).save(path, format="PNG")
        examples.text_to_image.append([text, i])
        examples.priming.append([str(path), text, max(1, token_rows // 2), i])
        examples.reconstruction.append([str(path)])
        examples.completion.append([_prefix(text), i])
    # two more prompts without pictures, so the text-to-image tab has a few more to choose from
    for i, text in enumerate(example_prompts(2, seed + 1), start=count):
        examples.text_to_image.append([text, i])
    return examples


def _prefix(text: str, words: int = 2) -> str:
    """The first words of a caption, as a text-completion prefix ("a small red circle ..." -> "a small")."""
    return " ".join(text.replace(",", " ,").split()[:words]).replace(" ,", ",")
