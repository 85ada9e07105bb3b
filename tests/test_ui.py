"""Unit tests of the UI's handlers and helpers, with a recording stand-in for the service (no model, no server)."""

import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image

from dalle_app.service import Update
from dalle_app.outputs import save_png
from dalle_app.ui import Handlers, build_demo, build_examples, progress_html, top_p_value


class RecordingService:
    """Answers like dalle_app.service.Service (same signatures) and records every call."""

    default_reference = "weights/default"

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.calls = []

    def load(self, reference):
        self.calls.append(("load", reference))
        return {"reference": reference, "image": {"fmap_size": 8}, "clip": {"params": {}} if "clip" in reference
                else None}

    def _images(self, kind, n, seed, settings):
        images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(n)]
        files = [save_png(im, self.output_dir / f"{kind}-{i}.png", {"seed": seed + i, "settings": settings})
                 for i, im in enumerate(images)]
        yield Update(images=images, fraction=0.5, progress_text="32/64 tokens", tokens_per_s=120.0, eta_s=0.25)
        yield Update(images=images, files=files, info={"seeds": [seed + i for i in range(n)]}, fraction=1.0,
                     done=True, progress_text="done in 0.5 s")

    def text_to_image(self, prompt, num_images=4, temperature=1.0, top_k=64, cond_scale=1.0, seed=-1, *, top_p=None,
                      model=None, rerank_keep=0, should_stop=None):
        self.calls.append(("text_to_image", dict(prompt=prompt, top_p=top_p, model=model, rerank_keep=rerank_keep,
                                                  should_stop=should_stop)))
        yield from self._images("t2i", int(num_images), int(seed), {"top_p": top_p})

    def prime_image(self, image, prompt, keep_rows=4, num_images=4, temperature=1.0, top_k=64, cond_scale=1.0,
                    seed=-1, *, top_p=None, model=None, box=None, should_stop=None):
        self.calls.append(("prime_image", dict(image=image, top_p=top_p, model=model, box=box)))
        yield Update(images=[Image.new("RGB", (8, 8))], progress_text="kept part")
        yield from self._images("prime", int(num_images), int(seed), {"top_p": top_p})

    def reconstruct(self, image, *, model=None):
        self.calls.append(("reconstruct", dict(image=image, model=model)))
        yield from list(self._images("vae", 3, 0, {}))[1:]

    def complete_text(self, prompt, num_completions=4, temperature=1.0, top_k=64, seed=-1, *, top_p=None, model=None,
                      should_stop=None):
        self.calls.append(("complete_text", dict(prompt=prompt, top_p=top_p, model=model)))
        yield Update(texts=[f"{prompt} circle"] * int(num_completions), done=True, fraction=1.0,
                     info={"seeds": [seed]}, progress_text="done")


@pytest.fixture
def service(tmp_path):
    return RecordingService(tmp_path)


def session(name):
    return SimpleNamespace(session_hash=name)


def test_top_p_one_means_off():
    assert top_p_value(1.0) is None and top_p_value(None) is None and top_p_value("") is None
    assert top_p_value(0.9) == pytest.approx(0.9)


def test_progress_bar_shows_fraction_rate_and_time_left():
    bar = progress_html(Update(fraction=0.5, tokens_per_s=120.0, eta_s=2.5))
    assert 'aria-valuenow="50"' in bar and "width:50.0%" in bar
    assert "120 tokens/s" in bar and "2.5 s left" in bar
    done = progress_html(Update(fraction=1.0, done=True, progress_text="done in 1.2 s"))
    assert "width:100.0%" in done and "done in 1.2 s" in done and "left" not in done
    assert progress_html() == "" and "stopping" in progress_html(idle="stopping...")


def test_text_to_image_passes_top_p_model_and_rerank_and_ends_on_the_written_pngs(service):
    h = Handlers(service)
    out = list(h.text_to_image("weights/other", "a red circle", 2, 1.0, 64, 0.8, 1.0, 7, True, 1,
                               request=session("a")))
    call = service.calls[-1][1]
    assert call["top_p"] == pytest.approx(0.8) and call["model"] == "weights/other" and call["rerank_keep"] == 1
    preview, final = out
    assert "120 tokens/s" in preview[1] and all(isinstance(im, Image.Image) for im in preview[0])
    assert [caption for _, caption in final[0]] == ["seed 7", "seed 8"]
    assert all(str(f).endswith(".png") for f, _ in final[0]) and final[2]["seeds"] == [7, 8] and final[3] == 7
    list(h.text_to_image(None, "a red circle", 1, 1.0, 64, 1.0, 1.0, 0, False, 1))
    assert service.calls[-1][1]["model"] is None and service.calls[-1][1]["top_p"] is None
    assert service.calls[-1][1]["rerank_keep"] == 0


def test_prime_complete_and_reconstruct_use_the_session_model(service):
    h = Handlers(service)
    out = list(h.prime_image("m1", "in.png", "a blue square", 4, True, 0, 0.5, 0.5, 1, 2, 1.0, 64, 0.7, 1.0, 3))
    assert service.calls[-1] == ("prime_image", {"image": "in.png", "top_p": 0.7, "model": "m1",
                                                 "box": (0, 0.5, 0.5, 1)})
    assert isinstance(out[0][3], Image.Image) and len(out[-1][0]) == 2  # kept part first, then completions
    from dalle_app.ui.handlers import _shown

    reranked = Update(files=["a.png", "b.png"], done=True, info={"seeds": [4, 2], "clip_scores": [0.31, 0.2]})
    assert _shown(reranked) == [("a.png", "seed 4 · CLIP 0.310"), ("b.png", "seed 2 · CLIP 0.200")]
    text = list(h.complete_text("m2", "a red", 2, 1.0, 64, 0.5, 4))
    assert service.calls[-1][1] == {"prompt": "a red", "top_p": 0.5, "model": "m2"}
    assert text[-1][0] == "a red circle\na red circle"
    files, _ = h.reconstruct("m3", "in.png")
    assert service.calls[-1][1]["model"] == "m3" and len(files) == 3


def test_stop_reaches_only_the_session_that_asked(service):
    h = Handlers(service)
    list(h.text_to_image(None, "x", 1, 1.0, 64, 1.0, 1.0, 0, False, 1, request=session("a")))
    stop_a = service.calls[-1][1]["should_stop"]
    list(h.text_to_image(None, "x", 1, 1.0, 64, 1.0, 1.0, 0, False, 1, request=session("b")))
    stop_b = service.calls[-1][1]["should_stop"]
    h.stop(session("a"))
    assert stop_a() is True and stop_b() is False


def test_a_stop_while_queued_ends_the_request_without_calling_the_service(service):
    h = Handlers(service)
    run = h.arm(session("a"))  # Generate's unqueued step; the request then waits in the queue
    assert h.cancel_if_queued(session("a")) == run  # queued: Stop's next step signals to take it out of the queue
    assert "stopped before it started" in h.stop(session("a"))
    calls = len(service.calls)
    out = list(h.text_to_image(None, "x", 1, 1.0, 64, 1.0, 1.0, 0, False, 1, run, request=session("a")))
    assert len(service.calls) == calls  # nothing computed
    assert len(out) == 1 and "stopped before it started" in out[0][1] and out[0][0] == gr.skip()
    assert list(h.prime_image(None, "in.png", "p", 4, False, 0, 0, 1, 1, 1, 1.0, 64, 1.0, 1.0, 0,
                              h.arm(session("a"), "prime"), request=session("a")))[-1][0] != gr.skip()
    assert service.calls[-1][0] == "prime_image"  # a Stop on one tab does not reach another tab's request

    again = h.arm(session("a"))  # Generate pressed again after the Stop: a new run, not stopped
    list(h.text_to_image(None, "x", 1, 1.0, 64, 1.0, 1.0, 0, False, 1, again, request=session("a")))
    assert service.calls[-1][1]["should_stop"]() is False
    assert h.cancel_if_queued(session("a")) == gr.skip()  # finished or running: no cancel (partial images instead)
    assert h.stop(session("a")) == gr.skip() and service.calls[-1][1]["should_stop"]() is True  # the run says so
    h.forget(session("a"))
    assert h.runs.queued(("a", "t2i")) is False and h.arm(session("a")) == 1


def test_load_model_returns_the_card_and_the_sessions_reference(service):
    h = Handlers(service)
    status, summary, card, ref, rerank, rows = h.load_model(None, "  weights/with-clip ")
    assert ref == "weights/with-clip" and card["reference"] == ref and service.calls[-1] == ("load", ref)
    assert "`weights/with-clip`" in summary and "| CLIP reranker | yes |" in summary and "Loaded" in status
    assert rerank.interactive is True and rows.maximum == 8
    *_, rerank, _ = h.load_model(None, "weights/plain")
    assert rerank.interactive is False and rerank.value is False


def test_a_model_that_cannot_be_loaded_is_one_sentence_beside_the_button_and_changes_nothing(service):
    h = Handlers(service)
    status, *rest = h.load_model(None, "  ")
    assert "No model was given" in status and status.count(". ") == 0 and rest == [gr.skip()] * 5


def test_card_summary_names_size_vae_tokenizer_and_device():
    from dalle_app.ui.handlers import card_markdown

    card = {"reference": "weights/x", "parameters": {"dalle": 6_700_000, "vae": 670_000, "total": 7_370_000},
            "image": {"size": 128, "fmap_size": 16, "tokens": 256}, "vae": {"kind": "DiscreteVAE", "num_tokens": 512},
            "tokenizer": {"kind": "yttm", "vocab_size": 160}, "hparams": {"text_seq_len": 32}, "clip": None,
            "device": "cuda", "dtype": "bfloat16"}
    text = card_markdown(card)
    for part in ("7.4 M parameters (dalle 6.7 M · vae 0.7 M)", "128 px, 16×16 = 256 tokens", "DiscreteVAE, 512 codes",
                 "yttm, 160 tokens, prompts of 32 tokens", "| CLIP reranker | no |", "cuda, bfloat16"):
        assert part in text
    assert "?" in card_markdown({})  # an odd card still renders


def test_send_to_priming_picks_the_selected_image_and_switches_tab():
    gallery = [("/tmp/a.png", None), ("/tmp/b.png", None)]
    path, prompt, tabs = Handlers.send_to_priming(gallery, 1, "a red circle")
    assert path == "/tmp/b.png" and prompt == "a red circle" and tabs.selected == "prime"
    assert Handlers.send_to_priming(gallery, None, "")[0] == "/tmp/a.png"  # nothing picked: the first one
    assert Handlers.send_to_priming(gallery, 5, "")[0] == "/tmp/a.png"  # a stale pick from a bigger gallery
    with pytest.raises(gr.Error, match="gallery is empty"):
        Handlers.send_to_priming([], 0, "")


def test_restore_fills_top_p(tmp_path):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png",
                    {"prompt": "a red circle", "seed": 5, "settings": {"num_images": 2, "temperature": 0.9,
                                                                       "top_k": 32, "top_p": 0.8,
                                                                       "cond_scale": 3.0}})
    values = Handlers.restore(path)
    assert values[:7] == ("a red circle", 2, 0.9, 32, 0.8, 3.0, 5) and values[7]["seed"] == 5
    no_top_p = save_png(Image.new("RGB", (4, 4)), tmp_path / "y.png", {"prompt": "p", "settings": {}})
    assert Handlers.restore(no_top_p)[4] == 1.0


def test_examples_are_world_scenes_with_their_captions(tmp_path):
    from dalle_app.world import parse_caption

    examples = build_examples(tmp_path, token_rows=8, count=3)
    assert len(examples.priming) == 3 and len(examples.text_to_image) == 5
    for (path, prompt, keep_rows, seed), (vae_path,) in zip(examples.priming, examples.reconstruction):
        assert Path(path).is_file() and vae_path == path and keep_rows == 4
        assert Image.open(path).size[0] >= 32
        parse_caption(prompt)  # a caption the world (and the built-in model) understands
    assert all(prefix and len(prefix.split()) <= 2 for prefix, _ in examples.completion)


def test_build_demo_keeps_the_api_names_and_adds_examples_and_top_p(service):
    demo = build_demo(service, concurrency=2)
    api = demo.get_api_info()["named_endpoints"]
    assert {name: [p["parameter_name"] for p in e["parameters"]] for name, e in api.items()} == {
        "/text_to_image": ["prompt", "num_images", "temperature", "top_k", "cond_scale", "seed"],
        "/prime_image": ["image", "prompt", "keep_rows", "num_images", "temperature", "top_k", "cond_scale", "seed"],
        "/reconstruct": ["image"],
        "/complete_text": ["prompt", "num_completions", "temperature", "top_k", "seed"],
    }
    config = json.dumps(demo.get_config_file(), default=str)
    for elem in ("t2i-examples", "prime-examples", "vae-examples", "text-examples", "t2i-top-p", "prime-top-p",
                 "text-top-p", "send-to-priming"):
        assert f'"{elem}"' in config
    assert ("load", "weights/default") in service.calls


def test_keep_alives_hold_the_bar_and_show_the_place_in_line():
    from dalle_app.ui.handlers import ProgressBar

    bar = ProgressBar()
    waiting = bar(Update(progress_text="waiting for the model (2 requests ahead)", waiting=True))
    assert "2 requests ahead" in waiting and "width:0.0%" in waiting
    assert "width:50.0%" in bar(Update(fraction=0.5, progress_text="32/64 tokens", tokens_per_s=10.0, eta_s=3.0))
    assert bar(Update(progress_text="32/64 tokens", waiting=True)) == gr.skip()  # a heartbeat while computing
    assert "width:50.0%" in bar(Update(progress_text="waiting for the model (1 request ahead)", waiting=True))


def test_choosing_a_catalog_model_fills_the_reference_box():
    from dalle_app.manager import BUILTIN_MODEL_DIR

    assert Handlers.catalog_reference("shapes-dalle") == str(BUILTIN_MODEL_DIR)
    assert Handlers.catalog_reference(None) == gr.skip()


def test_download_progress_bars_reach_the_browser_from_the_loading_thread():
    """Models load on a short-lived thread (dalle_app.service.turns.in_fresh_thread); huggingface_hub's tqdm bars there must
    still reach Gradio's progress display, which the model panel's Load event asks for (track_tqdm)."""
    import time

    from gradio_client import Client
    from tqdm.auto import tqdm

    from dalle_app.service.turns import in_fresh_thread
    from reliability_server import free_port

    def download():
        for _ in tqdm(range(4), desc="model.safetensors"):
            time.sleep(0.25)
        return "loaded"

    def load(reference, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return in_fresh_thread(download)

    with gr.Blocks() as demo:
        reference, card = gr.Textbox(), gr.Textbox()
        reference.submit(load, reference, card, api_name="load")
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        job = Client(f"http://127.0.0.1:{port}/", verbose=False).submit("x", api_name="/load")
        seen = []
        while not job.done():
            seen += [(p.desc, p.length) for p in job.status().progress_data or []]
            time.sleep(0.05)
        assert job.result() == "loaded"
        assert ("model.safetensors", 4) in seen
    finally:
        demo.close()


def test_the_images_gradio_serves_are_deleted_after_the_cache_time(service):
    """Gradio copies every served image (each live preview too) into its cache and remembers the path; without
    delete_cache a long-running demo's disk (and that record) grows with every request."""
    assert build_demo(service, cache_seconds=300).delete_cache == (300, 300)
    assert build_demo(service).delete_cache == (600, 3600)  # an hour, checked every ten minutes


def _guidance_starts(demo, label="Guidance scale (1 = off)"):
    config = demo.get_config_file()
    return [c["props"]["value"] for c in config["components"] if c.get("props", {}).get("label") == label]


def test_guidance_starts_at_the_default_models_recommendation(service, monkeypatch):
    import json
    from pathlib import Path

    assert _guidance_starts(build_demo(service)) == [1.0, 1.0]  # a model that recommends nothing: guidance off
    card = service.load("weights/default")
    monkeypatch.setattr(service, "load", lambda ref: {**card, "source": {"recommended_sampling": {"cond_scale": 3.0}}})
    assert _guidance_starts(build_demo(service)) == [3.0, 3.0]  # text to image and priming
    recommends = {"cond_scale": 3.0, "temperature": 0.8}
    monkeypatch.setattr(service, "load", lambda ref: {**card, "source": {"recommended_sampling": recommends}})
    # text to image and priming start at the recommended temperature; text completion stays at 1
    assert _guidance_starts(build_demo(service), "Temperature") == [0.8, 0.8, 1.0]
    from dalle_app.manager import BUILTIN_MODEL_DIR, ModelManager

    shipped = json.loads((Path(__file__).parents[1] / "weights/shapes-dalle/config.json").read_text())
    assert shipped["source"]["recommended_sampling"] == {"cond_scale": 1.5, "top_k": 8, "temperature": 0.9}
    loaded = ModelManager(device="cpu").load(str(BUILTIN_MODEL_DIR))  # and loading keeps it for the app's card
    assert loaded.info()["source"]["recommended_sampling"] == {"cond_scale": 1.5, "top_k": 8, "temperature": 0.9}
