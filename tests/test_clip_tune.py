"""Hard negatives for the CLIP reranker: contradicting captions, the loss, the tuning run and writing the result."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from app_factory import make_tiny_model
from dalle_app.engine import SamplingOptions
from dalle_app.evaluate import candidate_batches, clip_scores, generate
from dalle_app.manager import ModelManager
from dalle_app.models import CLIP
from dalle_app.training.clip_tune import (batch_of_scenes, hard_negative_loss, main, probe, trim_padding,
                                          tune_clip)
from dalle_app.world import CONTRADICTIONS, caption, contradicting_captions, parse_caption, sample_scene


def test_contradicting_captions_are_false_of_the_scene_and_change_one_thing():
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        assert parse_caption(text).matches(scene)
        for kind, wrong in contradicting_captions(scene, text, rng).items():
            seen.add(kind)
            assert not parse_caption(wrong).matches(scene), (text, kind, wrong)
            if kind == "dropped object":
                assert len(parse_caption(wrong).objects) == 1 and len(scene.objects) == 2
                continue
            # the same caption with one word replaced (and its article adjusted)
            a, b = text.split(), wrong.split()
            diff = [(x, y) for x, y in zip(a, b) if x != y and {x, y} != {"a", "an"}]
            assert len(a) == len(b) and len(diff) == 1, (text, wrong)
    assert seen == set(CONTRADICTIONS)


def test_trim_padding_drops_only_trailing_all_padding_columns():
    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 8, 0, 0]])
    assert trim_padding(ids).tolist() == [[5, 6, 0], [7, 0, 8]]
    assert trim_padding(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("clip") / "tiny")
    return folder, ModelManager(device="cpu", dtype="float32", allowed_roots=[folder.parent]).load(str(folder))


def test_without_negatives_the_loss_is_clips_own_and_negatives_add_to_it(tiny):
    _, model = tiny
    clip, tok, vae, seq = model.clip, model.tokenizer, model.vae, model.dalle.text_seq_len
    images, texts, wrong = batch_of_scenes(random.Random(1), 6, clip.image_size)
    ids = tok.tokenize(texts, seq, truncate_text=True)
    own = clip(ids, vae.norm(images), text_mask=ids != 0, return_loss=True)
    plain = hard_negative_loss(clip, tok, vae, (images, texts, [{} for _ in texts]), seq)
    torch.testing.assert_close(plain, own)
    # each image now also competes with its contradicting captions: the image -> text term can only grow
    assert hard_negative_loss(clip, tok, vae, (images, texts, wrong), seq) > plain


def test_tuning_lowers_the_hard_negative_loss_and_the_probe_reports_every_kind(tiny):
    _, model = tiny
    tok, vae, seq = model.tokenizer, model.vae, model.dalle.text_seq_len
    torch.manual_seed(0)  # the tiny model's own CLIP (dim 16) learns too slowly to show in a fast test
    clip = CLIP(dim_text=64, dim_image=64, dim_latent=64, num_text_tokens=tok.vocab_size, text_enc_depth=1,
                text_seq_len=seq, text_heads=4, visual_enc_depth=1, visual_heads=4, visual_image_size=32,
                visual_patch_size=8).requires_grad_(False)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    run = tune_clip(clip, tok, vae, seq, steps=120, batch_size=32, lr=3e-3, warmup=5, progress=False)
    losses = run["losses"]
    assert run["steps"] == 120 and sum(losses[-20:]) / 20 < 0.95 * sum(losses[:20]) / 20, losses
    assert any(not torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in clip.parameters())  # handed back frozen, as it came
    result = probe(clip, tok, vae, seq, n=40, batch=20, reconstruct=False)
    assert set(result) == set(CONTRADICTIONS)
    assert all(0 <= frac <= 1 and count > 0 for frac, count in result.values())


def test_the_command_writes_the_tuned_clip_in_the_stored_dtype_and_leaves_the_rest(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    monkeypatch.setenv("DALLE_APP_MODEL_DIRS", f"{folder.parent}:{tmp_path}")
    out = tmp_path / "tuned"
    main(["--model", str(folder), "--out", str(out), "--steps", "3", "--batch", "8", "--probe-n", "20",
          "--device", "cpu"])
    config = json.loads((out / "config.json").read_text())
    (record,) = config["source"]["clip_hard_negative_tuning"]
    assert record["steps"] == 3 and set(record["probe_after"]) <= set(CONTRADICTIONS)
    assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    original, tuned = load_file(str(folder / "clip.safetensors")), load_file(str(out / "clip.safetensors"))
    assert original.keys() == tuned.keys() and any(not torch.equal(original[k], tuned[k]) for k in original)
    assert all(tuned[k].dtype == original[k].dtype for k in original)
    reloaded = ModelManager(device="cpu").load(str(out))
    for k, v in reloaded.clip.state_dict().items():
        torch.testing.assert_close(v.float(), tuned[k].float())
    # a second run, in place, is recorded after the first and trains on other scenes
    main(["--model", str(out), "--steps", "2", "--batch", "8", "--probe-n", "20", "--device", "cpu"])
    rounds = json.loads((out / "config.json").read_text())["source"]["clip_hard_negative_tuning"]
    assert [r["steps"] for r in rounds] == [3, 2] and [r["seed"] for r in rounds] == [0, 1]


def test_reranking_returns_each_captions_best_candidate_by_clip_whatever_the_batch(tiny):
    _, model = tiny
    captions = ["a red circle", "a blue star on a green background"]
    options = SamplingOptions(top_k=8)
    (text, decoded), = candidate_batches(model, captions, options, of=3, batch=6)
    scores = clip_scores(model.clip, text, decoded).view(2, 3)
    assert len(set(scores.flatten().tolist())) == 6  # distinct candidates, so the pick means something
    best = decoded.view(2, 3, *decoded.shape[1:])[torch.arange(2), scores.argmax(dim=1)]
    picked = generate(model, captions, options, rerank=3, batch=4)  # chunks of one caption's 3 candidates
    for got, want in zip(picked, best):
        torch.testing.assert_close(got, model.vae.to_unit_range(want.float()))
