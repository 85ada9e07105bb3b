"""Tests of the synthetic shapes world: scenes, rendering, captions, data streams and the judge."""

import dataclasses
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_app.world import (
    COLORS, SHAPES, CaptionSpec, Obj, ObjSpec, Scene, ShapesBatches, ShapesDataset, caption, caption_vocabulary,
    fidelity_table, format_fidelity_table, heldout_captions, heldout_scenes, measure_judge_accuracy, parse_caption,
    place, read_image, render, render_with_boxes, sample_scene, score,
)
from dalle_app.world.dataset import sample_pair, training_stream
from dalle_app.world.scene import IMAGE_SIZE, MARGIN, MIN_GAP, RGB, relation_holds


def scenes(n, seed=0):
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# scenes and rendering


def test_render_is_deterministic_for_a_seed():
    scene = scenes(1, seed=3)[0]
    a = np.asarray(render(scene, random.Random(7)))
    b = np.asarray(render(scene, random.Random(7)))
    assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    stream_a, stream_b = training_stream(5), training_stream(5)
    for _ in range(20):
        (img_a, text_a, _), (img_b, text_b, _) = sample_pair(stream_a), sample_pair(stream_b)
        assert text_a == text_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))


def test_jitter_moves_objects_and_no_rng_centres_them():
    scene = Scene("white", (Obj("circle", "red", "small", "center"),))
    assert place(scene) == [(53, 53, 75, 75)]
    boxes = {tuple(place(scene, random.Random(seed))[0]) for seed in range(30)}
    assert len(boxes) > 5
    assert all(abs(b[0] - 53) <= 3 and abs(b[1] - 53) <= 3 for b in boxes)


def test_render_is_antialiased_and_uses_named_colours():
    scene = Scene("blue", (Obj("circle", "yellow", "large", "center"),))
    pixels = {tuple(p) for p in np.asarray(render(scene)).reshape(-1, 3)}
    assert RGB["blue"] in pixels and RGB["yellow"] in pixels
    assert len(pixels) > 4  # blended edge pixels exist


def test_sampled_scenes_follow_the_rules():
    for i, scene in enumerate(scenes(1500, seed=1)):
        image, boxes = render_with_boxes(scene, random.Random(i))
        for box in boxes:
            assert MARGIN <= box[0] and MARGIN <= box[1] and box[2] <= IMAGE_SIZE - MARGIN and box[3] <= IMAGE_SIZE - MARGIN
        if len(boxes) == 2:
            a, b = boxes
            gap = max(max(a[0], b[0]) - min(a[2], b[2]), max(a[1], b[1]) - min(a[3], b[3]))
            assert gap >= MIN_GAP
        if scene.relation is not None:
            assert relation_holds(scene.relation, scene.objects[0].position, scene.objects[1].position)
        assert all(obj.color != scene.background for obj in scene.objects)
    kinds = {(len(s.objects), s.relation is not None) for s in scenes(300)}
    assert kinds == {(1, False), (2, False), (2, True)}


def test_illegal_scenes_are_refused():
    with pytest.raises(ValueError, match="illegible"):
        Scene("white", (Obj("star", "pink", "small", "center"),))
    with pytest.raises(ValueError, match="overlap"):
        Scene("black", (Obj("star", "red", "large", "left"), Obj("ring", "blue", "large", "center")))
    with pytest.raises(ValueError, match="satisfy"):
        Scene("black", (Obj("star", "red", "small", "left"), Obj("ring", "blue", "small", "right")), "above")


# ---------------------------------------------------------------------------------------------------------------
# captions


def test_captions_are_true_of_their_scenes_and_simple():
    rng = random.Random(11)
    vocabulary = set(caption_vocabulary())
    left_out = {"size": 0, "color": 0, "position": 0, "background": 0}
    for _ in range(3000):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        spec = parse_caption(text)
        assert spec.matches(scene), (text, scene)
        assert len(spec.objects) == len(scene.objects)
        assert re.fullmatch(r"[a-z ,]+", text)
        words = text.replace(",", " ").split()
        assert set(words) <= vocabulary and len(words) + text.count(",") <= 24
        left_out["background"] += spec.background is None
        for name in ("size", "color", "position"):
            left_out[name] += any(getattr(o, name) is None for o in spec.objects)
    assert all(count > 100 for count in left_out.values()), left_out


def test_parse_caption_reads_the_issue_examples():
    spec = parse_caption("a small red circle in the top left on a blue background")
    assert spec == CaptionSpec("blue", (ObjSpec("circle", "red", "small", "top left"),), None)
    spec = parse_caption("on a yellow background, a large green star")
    assert spec == CaptionSpec("yellow", (ObjSpec("star", "green", "large", None),), None)
    spec = parse_caption("a purple heart to the left of a white square")
    assert spec == CaptionSpec(None, (ObjSpec("heart", "purple"), ObjSpec("square", "white")), "to the left of")
    assert parse_caption("a blue ring at the bottom right").objects[0].position == "bottom right"
    assert parse_caption("in the top left, a big grey star").objects == (ObjSpec("star", "gray", "large", "top left"),)
    assert parse_caption("nothing to see here").objects == ()


def test_a_wrong_scene_does_not_match_its_caption():
    scene = Scene("blue", (Obj("circle", "red", "small", "top left"),))
    spec = CaptionSpec.from_scene(scene)
    assert spec.matches(scene)
    assert not spec.matches(dataclasses.replace(scene, background="green"))
    assert not spec.matches(Scene("blue", (Obj("circle", "red", "small", "top right"),)))


# ---------------------------------------------------------------------------------------------------------------
# data streams


def test_dataset_yields_tensors_and_workers_get_different_streams():
    loader = torch.utils.data.DataLoader(ShapesDataset(seed=0), batch_size=3, num_workers=2)
    batches = []
    for i, batch in enumerate(loader):
        batches.append(batch)
        if i == 1:
            break
    (x0, c0), (x1, c1) = batches  # batch 0 from worker 0, batch 1 from worker 1
    assert x0.shape == (3, 3, 128, 128) and x0.dtype == torch.float32
    assert 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0
    assert c0 != c1 and not torch.equal(x0, x1)
    image, text = next(iter(ShapesDataset(seed=0, image_size=64)))
    assert image.shape == (3, 64, 64) and isinstance(text, str)


def test_heldout_captions_are_deterministic_and_from_their_own_stream():
    first = heldout_captions(200, seed=0)
    assert first == heldout_captions(200, seed=0) == [c for _, c in heldout_scenes(200, seed=0)]
    assert first != heldout_captions(200, seed=1)
    rng = training_stream(0)
    train = [sample_pair(rng)[1] for _ in range(2000)]
    strict = heldout_captions(100, seed=0, exclude_training_sample=2000)
    assert len(strict) == 100 and not set(strict) & set(train)


# ---------------------------------------------------------------------------------------------------------------
# the judge


def test_judge_is_accurate_on_fresh_renders():
    accuracy = measure_judge_accuracy(n_scenes=300, seed=99)
    assert all(value >= 0.99 for value in accuracy.values()), accuracy


def test_judge_tolerates_noise():
    accuracy = measure_judge_accuracy(n_scenes=60, seed=5, noise=15.0)
    assert all(value >= 0.95 for value in accuracy.values()), accuracy


def test_judge_reads_a_blank_image_as_no_object():
    reading = read_image(Image.new("RGB", (128, 128), RGB["cyan"]))
    assert reading.background == "cyan" and reading.objects == [] and reading.is_blank
    assert "no object" in reading.describe()
    assert read_image(torch.zeros(3, 128, 128)).background == "black"  # tensors in [0, 1] work too


def test_judge_does_not_crash_on_garbage():
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), rng.random((3, 64, 64)),
                  np.full((256, 256), 200, dtype=np.uint8)):
        reading = read_image(image)
        assert isinstance(reading.background, str)
        for obj in reading.objects:
            assert obj.shape in SHAPES + ("unknown",) and obj.color in COLORS + ("unknown",)
    with pytest.raises(ValueError, match="RGB image"):
        read_image(np.zeros((2, 2, 2, 2)))


def test_score_catches_a_wrong_image():
    scene = Scene("blue", (Obj("heart", "red", "medium", "left"), Obj("star", "white", "small", "right")),
                  "to the left of")
    spec = CaptionSpec.from_scene(scene)
    right = score(spec, read_image(render(scene)))
    assert right == {"background": True, "color": True, "shape": True, "size": True, "position": True,
                     "relation": True, "count": True, "both": True}

    def objects(first, second=scene.objects[1]):
        return (first, second)

    wrong = {
        "color": Scene("blue", objects(dataclasses.replace(scene.objects[0], color="yellow"))),
        "shape": Scene("blue", objects(dataclasses.replace(scene.objects[0], shape="ring"))),
        "size": Scene("blue", objects(dataclasses.replace(scene.objects[0], size="small"))),
        "background": dataclasses.replace(scene, background="black"),
    }
    for attribute, other in wrong.items():
        result = score(spec, read_image(render(other)))
        assert result[attribute] is False, attribute
        assert result.get("both", True) is (attribute == "background")  # "both" is about the objects only
    swapped = Scene("blue", (dataclasses.replace(scene.objects[0], position="right"),
                             dataclasses.replace(scene.objects[1], position="left")), "to the right of")
    result = score(spec, read_image(render(swapped)))
    assert result["relation"] is False and result["position"] is False and result["both"] is False
    only_shape = score(parse_caption("a heart and a star"), read_image(render(swapped)))
    assert set(only_shape) == {"shape", "count", "both"} and all(only_shape.values())
    blank = score(spec, read_image(Image.new("RGB", (128, 128), RGB["blue"])))
    assert blank["background"] and not blank["shape"] and not blank["count"] and not blank["both"]


def test_fidelity_table_of_true_and_shuffled_images():
    pairs = heldout_scenes(60, seed=3)
    captions = [text for _, text in pairs]
    images = [render(scene, random.Random(i)) for i, (scene, _) in enumerate(pairs)]
    table = fidelity_table(captions, images)
    assert {"background", "color", "shape", "both"} <= set(table)
    assert all(row["accuracy"] == 1.0 and row["n"] > 0 for row in table.values()), table
    shuffled = fidelity_table(captions, images[1:] + images[:1])
    assert shuffled["shape"]["accuracy"] < 0.6 and shuffled["background"]["accuracy"] < 0.5
    assert "| shape | 100.0% |" in format_fidelity_table(table)
    with pytest.raises(ValueError, match="one image per caption"):
        fidelity_table(captions, images[:-1])


def test_batches_are_uint8_channels_last_and_match_the_per_sample_stream():
    images, captions = next(iter(ShapesBatches(4, seed=3)))
    assert images.shape == (4, 128, 128, 3) and images.dtype == torch.uint8 and len(captions) == 4
    singles = iter(ShapesDataset(seed=3))
    for i in range(4):
        image, text = next(singles)
        assert text == captions[i]
        assert torch.equal((image * 255).round().to(torch.uint8), images[i].permute(2, 0, 1))
    small, _ = next(iter(ShapesBatches(2, seed=3, image_size=32)))
    assert small.shape == (2, 32, 32, 3)


def test_judge_reads_soft_renders():
    accuracy = measure_judge_accuracy(n_scenes=150, seed=7, blur=1.5)  # softer edges than the VAE's reconstructions
    assert all(value >= 0.98 for value in accuracy.values()), accuracy
