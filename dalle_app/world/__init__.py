"""The synthetic shapes world: scenes, their rendering and captions, training data, and a judge of generated images.

    from dalle_app.world import sample_scene, render, caption, parse_caption, read_image, score
    rng = random.Random(0)
    scene = sample_scene(rng)          # Scene(background, objects=(Obj(shape, color, size, position), ...), relation)
    image = render(scene, rng)         # 128x128 RGB PIL image, anti-aliased
    text = caption(scene, rng)         # e.g. "a small red circle in the top left on a blue background"
    score(parse_caption(text), read_image(image))   # {"background": True, "color": True, ...}

See scene.py, render.py, captions.py, dataset.py and judge.py for the rules of the world and the judge, and
``python -m dalle_app.world --help`` for a sample grid, speed and judge-accuracy measurements.
"""

from .captions import CONTRADICTIONS, CaptionSpec, ObjSpec, caption, caption_vocabulary, contradicting_captions, parse_caption
from .dataset import ShapesBatches, ShapesDataset, heldout_captions, heldout_scenes, image_to_tensor, sample_pair
from .judge import (ATTRIBUTES, ObjReading, Reading, fidelity_table, format_fidelity_table, measure_judge_accuracy,
                    read_image, score)
from .render import place, render, render_with_boxes, shape_mask
from .scene import COLORS, IMAGE_SIZE, POSITIONS, RELATIONS, SHAPES, SIZES, Obj, Scene, sample_scene

__all__ = [
    "ATTRIBUTES", "COLORS", "CONTRADICTIONS", "IMAGE_SIZE", "POSITIONS", "RELATIONS", "SHAPES", "SIZES",
    "CaptionSpec", "Obj", "ObjReading", "ObjSpec", "Reading", "Scene", "ShapesBatches", "ShapesDataset",
    "caption", "caption_vocabulary", "contradicting_captions", "fidelity_table", "format_fidelity_table", "heldout_captions", "heldout_scenes",
    "image_to_tensor", "measure_judge_accuracy", "parse_caption", "place", "read_image", "render",
    "render_with_boxes", "sample_pair", "sample_scene", "score", "shape_mask",
]
