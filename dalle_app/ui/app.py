"""The Gradio Blocks app: four tabs, a per-session model panel, one-click examples, named API endpoints.

All work is done by `dalle_app.service`; the handlers that call it are in `handlers.py`.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..manager import recommended_sampling
from ..service import MAX_IMAGES, RequestError
from .examples import build_examples, example_prompts
from .handlers import Handlers, card_markdown, error, run_to_end, stream_updates

GPU = "gpu"  # one concurrency group for everything that runs the model

__all__ = ["build_demo", "checked_image", "example_prompts"]


def checked_image(**kwargs) -> gr.Image:
    """A gr.Image whose upload check answers in one sentence (Gradio's own wraps PIL's error in a long generic text).

    The check is set on the instance: a gr.Image subclass would make Gradio write a .pyi file next to this module."""
    from ..images import load_image

    image = gr.Image(**{"image_mode": None, **kwargs})  # Gradio's default "RGB" would clip 16-bit uploads to white
    original = image.preprocess

    def preprocess(payload):
        path = getattr(payload, "path", None)
        try:
            if path:
                load_image(path)  # opens lazily and refuses huge images before they are decoded
            return original(payload)
        except Exception as exc:  # noqa: BLE001
            raise error(exc if isinstance(exc, RequestError) else RequestError(
                "The image could not be read; upload a PNG, JPEG or WebP picture.")) from None

    image.preprocess = preprocess
    return image


def _final(outputs):
    """shown(update) for an API endpoint: nothing (None) until the final update, then outputs(update). Not
    gr.skip(): Gradio 6.31 keeps one more component per output in the session for every gr.skip() a generator
    yields (2.5 MB per 100 API requests of one client); clients take only the final value."""
    return lambda u: outputs(u) if u.done else (None, None)


def _sampling(prefix: str, n_label: str = "Number of images", guidance: bool = True,
              start: dict | None = None) -> dict:
    """The shared sampling controls of a tab (created in the current layout context). `start`: the starting
    cond_scale / top_k / temperature, a model's `recommended_sampling` (default: guidance off, top-k 64, 1)."""
    start = start or recommended_sampling({})
    c = {"n": gr.Slider(1, MAX_IMAGES, value=4, step=1, label=n_label, elem_id=f"{prefix}-n"),
         "temperature": gr.Slider(0.05, 3.0, value=start["temperature"], step=0.05, label="Temperature"),
         "top_k": gr.Number(value=start["top_k"], precision=0, minimum=0, label="Top-k (0 = all)"),
         "top_p": gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (1 = off)", elem_id=f"{prefix}-top-p")}
    if guidance:
        c["cond_scale"] = gr.Slider(0.0, 10.0, value=start["cond_scale"], step=0.5,
                                    label="Guidance scale (1 = off)")
    return c


def build_demo(service, *, concurrency: int | None = None, examples_dir: str | Path | None = None,
               cache_seconds: int = 3600) -> gr.Blocks:
    """The app's Blocks; call `.queue(...)` and `.launch(...)` on it.

    `concurrency` is how many model requests Gradio passes to the service at once; by default the service's
    `max_active`, so its scheduler can interleave them fairly (it bounds the GPU workers itself) while later
    requests wait in Gradio's queue with their position shown. Example pictures are rendered into `examples_dir`
    (default: under the service's output folder). Gradio copies every image it serves, each live preview too, into
    its cache and remembers the path: `cache_seconds` is how long those copies are kept (checked as often), so a
    long-running demo's disk, and Gradio's record of those paths, stay bounded."""
    concurrency = int(concurrency or getattr(service, "max_active", 1))
    h = Handlers(service)
    default_ref = service.default_reference
    card = service.load(default_ref)
    side = (card.get("image") or {}).get("fmap_size") or 16
    recommended = recommended_sampling(card)  # the default model's
    examples = build_examples(Path(examples_dir or Path(service.output_dir) / "examples"), token_rows=side)

    # ------------------------------------------------------------------------------ API endpoints (exact names)
    # Generators that yield nothing new until the end: Gradio can then cancel them (Job.cancel(), a client that goes
    # away), which closes the service's request and frees its turn on the model at once.
    def text_to_image(prompt, num_images, temperature, top_k, cond_scale, seed):
        """Images for a prompt: returns the PNG files and {seeds, seconds, tokens_per_second, notes}."""
        yield from stream_updates(
            lambda: service.text_to_image(prompt, num_images, temperature, top_k, cond_scale, seed),
            _final(lambda u: (u.files, u.info)))

    def prime_image(image, prompt, keep_rows, num_images, temperature, top_k, cond_scale, seed):
        """Keep the top `keep_rows` token rows of an image and complete the rest from a prompt."""
        yield from stream_updates(
            lambda: service.prime_image(image, prompt, keep_rows, num_images, temperature, top_k, cond_scale, seed),
            _final(lambda u: (u.files, u.info)))

    def reconstruct(image):
        """The image as the VAE sees it, its reconstruction and token grid; PSNR and codebook usage."""
        last = run_to_end(service.reconstruct(image))
        return last.files, last.info

    def complete_text(prompt, num_completions, temperature, top_k, seed):
        """Completions of a prompt prefix, one per line, and {seeds, seconds, completions}."""
        yield from stream_updates(
            lambda: service.complete_text(prompt, num_completions, temperature, top_k, seed),
            _final(lambda u: ("\n".join(u.texts), u.info)))

    with gr.Blocks(title="dalle_app", analytics_enabled=False,
                   delete_cache=(min(600, cache_seconds), cache_seconds)) as demo:
        gr.Markdown("# dalle_app\nDALLE-pytorch models: text to image, priming, VAE reconstruction, text completion.")
        model = gr.State(None)  # this session's model reference; None = the app's default model
        last_seed = gr.State(-1)
        selected = gr.State(None)  # index of the gallery image picked for "Send to priming"
        runs = {tab: gr.State(0) for tab in ("t2i", "prime", "text")}  # the run number Generate armed, per tab
        with gr.Accordion("Model", open=False, elem_id="model-panel"):
            with gr.Row():
                from ..manager import Catalog
                catalog = Catalog()
                default_name = next((n for n in catalog.names() if catalog.get(n) == default_ref), None)
                catalog_choice = gr.Dropdown(catalog.names(), label="Catalog model", value=default_name)
                model_ref = gr.Textbox(label="Hub reference or local path", value=default_ref,
                                       placeholder="owner/name[@revision] or weights/folder")
                load_btn = gr.Button("Load model", elem_id="load-model")
            model_status = gr.Markdown(elem_id="model-status")
            gr.Markdown("The model you load here is used for your requests only; other visitors keep theirs.")
            model_summary = gr.Markdown(card_markdown(card), elem_id="model-summary")
            with gr.Accordion("Full model card (JSON)", open=False):
                model_card = gr.JSON(value=card, label="Model card", elem_id="model-card")
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="t2i"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", lines=1, placeholder="a red circle on a blue background")
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                        t2i = _sampling("t2i", start=recommended)
                        with gr.Row():
                            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", scale=3)
                            random_btn = gr.Button("🎲", scale=1, min_width=40)
                            reuse_btn = gr.Button("♻️", scale=1, min_width=40)
                        with gr.Row():
                            rerank = gr.Checkbox(label="CLIP rerank", value=False, interactive=bool(card.get("clip")),
                                                 elem_id="t2i-rerank")
                            keep = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Keep best M", elem_id="t2i-keep")
                        t2i_examples = gr.Examples(examples.text_to_image, inputs=[prompt, seed], label="Examples",
                                                   cache_examples=False, api_visibility="private",
                                                   elem_id="t2i-examples")
                    with gr.Column():
                        gallery = gr.Gallery(label="Images", format="png", columns=4,
                                             elem_id="gallery", interactive=False)
                        send_btn = gr.Button("Send selected image to priming", size="sm", elem_id="send-to-priming")
                        progress = gr.HTML(elem_id="progress")
                        info = gr.JSON(label="Seeds and timing", elem_id="info")
                        with gr.Accordion("Read parameters from a PNG", open=False):
                            png_file = gr.File(label="PNG written by this app", file_types=[".png"], elem_id="png-file")
                            png_params = gr.JSON(label="Parameters", elem_id="png-params")
            with gr.Tab("Image priming", id="prime"):
                with gr.Row():
                    with gr.Column():
                        prime_input = checked_image(type="filepath", label="Image", format="png", height=320,
                                                    elem_id="prime-input")
                        prime_prompt = gr.Textbox(label="Prompt", elem_id="prime-prompt")
                        keep_rows = gr.Slider(0, side, value=side // 2, step=1, label="Token rows to keep (top)",
                                              elem_id="prime-keep-rows")
                        use_box = gr.Checkbox(label="Also keep a box (fractions of the image)", elem_id="prime-use-box")
                        with gr.Row():
                            box = [gr.Number(v, label=n, minimum=0, maximum=1, min_width=60, elem_id=f"prime-box-{n}")
                                   for n, v in (("left", 0.0), ("top", 0.5), ("right", 0.5), ("bottom", 1.0))]
                        prime = _sampling("prime", start=recommended)
                        prime_seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="prime-seed")
                        with gr.Row():
                            prime_btn = gr.Button("Complete image", variant="primary", elem_id="prime-run")
                            prime_stop = gr.Button("Stop", variant="stop", elem_id="prime-stop")
                        prime_examples = gr.Examples(examples.priming, inputs=[prime_input, prime_prompt, keep_rows,
                                                                                prime_seed],
                                                     label="Examples", cache_examples=False, api_visibility="private",
                                                     elem_id="prime-examples")
                    with gr.Column():
                        kept = gr.Image(label="Kept part", format="png", height=256, elem_id="prime-kept")
                        prime_gallery = gr.Gallery(label="Completions", format="png", columns=4,
                                                   elem_id="prime-gallery")
                        prime_progress = gr.HTML(elem_id="prime-progress")
                        prime_info = gr.JSON(label="Seeds and timing", elem_id="prime-info")
            with gr.Tab("VAE reconstruction", id="vae"):
                with gr.Row():
                    with gr.Column():
                        vae_input = checked_image(type="filepath", label="Image", format="png", height=320)
                        vae_btn = gr.Button("Reconstruct", variant="primary")
                        vae_examples = gr.Examples(examples.reconstruction, inputs=[vae_input], label="Examples",
                                                   cache_examples=False, api_visibility="private",
                                                   elem_id="vae-examples")
                    with gr.Column():
                        vae_gallery = gr.Gallery(label="Input as the VAE sees it · reconstruction · token grid",
                                                 format="png", columns=3, elem_id="vae-gallery")
                        vae_info = gr.JSON(label="PSNR and codebook usage", elem_id="vae-info")
            with gr.Tab("Text completion", id="text"):
                with gr.Row():
                    with gr.Column():
                        text_prompt = gr.Textbox(label="Prompt prefix", placeholder="a small red")
                        text = _sampling("text", "Number of completions", guidance=False)
                        text_seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                        with gr.Row():
                            text_btn = gr.Button("Complete", variant="primary", elem_id="text-run")
                            text_stop = gr.Button("Stop", variant="stop", elem_id="text-stop")
                        text_examples = gr.Examples(examples.completion, inputs=[text_prompt, text_seed],
                                                    label="Examples", cache_examples=False, api_visibility="private",
                                                    elem_id="text-examples")
                    with gr.Column():
                        completions = gr.Textbox(label="Completions", lines=8, elem_id="completions")
                        text_progress = gr.HTML(elem_id="text-progress")
                        text_info = gr.JSON(label="Seeds and timing", elem_id="text-info")

        # -------------------------------------------------------------------------- named API endpoints
        # hidden triggers with the documented parameter names; they use the app's default model. Defined before the
        # UI's events, which Gradio also names after their functions: the public endpoints keep the plain names.
        api = dict(concurrency_id=GPU, concurrency_limit=concurrency)
        api_files = gr.Gallery(visible=False, format="png")
        api_info = gr.JSON(visible=False)
        api_text = gr.Textbox(visible=False)
        hidden = [gr.Button(visible=False) for _ in range(4)]
        t2i_api_inputs = [prompt, t2i["n"], t2i["temperature"], t2i["top_k"], t2i["cond_scale"], seed]
        hidden[0].click(text_to_image, t2i_api_inputs, [api_files, api_info], api_name="text_to_image", **api)
        hidden[1].click(prime_image, [prime_input, prime_prompt, keep_rows, prime["n"], prime["temperature"],
                                      prime["top_k"], prime["cond_scale"], prime_seed], [api_files, api_info],
                        api_name="prime_image", **api)
        hidden[2].click(reconstruct, vae_input, [api_files, api_info], api_name="reconstruct", **api)
        hidden[3].click(complete_text, [text_prompt, text["n"], text["temperature"], text["top_k"], text_seed],
                        [api_text, api_info], api_name="complete_text", **api)

        # -------------------------------------------------------------------------- events of the tabs
        # Each run is two steps: an unqueued one that arms a new run number for the session's tab (at once, so a
        # Stop pressed while the request still waits in the queue reaches it), then the queued request itself.
        ui = dict(concurrency_id=GPU, concurrency_limit=concurrency, api_visibility="private")
        quick = dict(queue=False, api_visibility="private")

        def wire(tab, triggers, handler, inputs, outputs, stop_button, progress_out):
            arm, stop, cancel_if_queued = h.controls(tab)
            queued = [trigger(arm, None, runs[tab], **quick).then(handler, [*inputs, runs[tab]], outputs, **ui)
                      for trigger in triggers]
            # Stop: flag the run (a running request returns its partial result), then, only while the request is
            # still waiting in Gradio's queue, change a hidden signal whose change event takes it out of the queue
            # (Gradio drops `cancels` on a .then/.success step, so the cancel hangs on a component's own event).
            signal = gr.Number(0, visible="hidden", elem_id=f"{tab}-cancel-signal")
            stop_button.click(stop, None, progress_out, **quick).then(cancel_if_queued, None, signal, **quick)
            signal.change(None, None, None, cancels=queued, api_visibility="private")

        wire("t2i", (generate_btn.click, prompt.submit, t2i_examples.load_input_event.then), h.text_to_image,
             [model, prompt, t2i["n"], t2i["temperature"], t2i["top_k"], t2i["top_p"], t2i["cond_scale"], seed,
              rerank, keep], [gallery, progress, info, last_seed], stop_btn, progress)
        wire("prime", (prime_btn.click, prime_examples.load_input_event.then), h.prime_image,
             [model, prime_input, prime_prompt, keep_rows, use_box, *box, prime["n"], prime["temperature"],
              prime["top_k"], prime["top_p"], prime["cond_scale"], prime_seed],
             [prime_gallery, prime_progress, prime_info, kept], prime_stop, prime_progress)
        wire("text", (text_btn.click, text_prompt.submit, text_examples.load_input_event.then), h.complete_text,
             [model, text_prompt, text["n"], text["temperature"], text["top_k"], text["top_p"], text_seed],
             [completions, text_progress, text_info], text_stop, text_progress)
        for trigger in (vae_btn.click, vae_examples.load_input_event.then):
            trigger(h.reconstruct, [model, vae_input], [vae_gallery, vae_info], **ui)

        random_btn.click(lambda: -1, None, seed, **quick)
        reuse_btn.click(lambda s: s, last_seed, seed, **quick)
        gallery.select(h.select, None, selected, **quick)
        gallery.change(lambda: None, None, selected, **quick)  # a new generation forgets the old pick
        send_btn.click(h.send_to_priming, [gallery, selected, prompt], [prime_input, prime_prompt, tabs], **quick)
        restored = {"prompt": prompt, "parameters": png_params, "prime_image": prime_input,
                    "prime_prompt": prime_prompt, "keep_rows": keep_rows, "use_box": use_box, "tab": tabs,
                    **dict(zip(("box_left", "box_top", "box_right", "box_bottom"), box)), "seed": seed,
                    "prime_seed": prime_seed, "num_images": t2i["n"], "prime_num_images": prime["n"],
                    **{name: t2i[name] for name in ("temperature", "top_k", "top_p", "cond_scale")},
                    **{f"prime_{name}": prime[name] for name in ("temperature", "top_k", "top_p", "cond_scale")}}
        png_file.upload(h.restore, png_file, [restored[name] for name in h.RESTORED], api_visibility="private")
        # loading reads weights: it runs in the queue, but beside the model work, not in its group
        # .input, not .change: Gradio may fire .change once the page mounts, which overwrote a reference typed
        # in the first moments with the default one
        catalog_choice.input(h.catalog_reference, catalog_choice, model_ref, **quick)
        load_btn.click(h.load_model, [catalog_choice, model_ref], [model_status, model_summary, model_card, model, rerank, keep_rows],
                       concurrency_limit=1, api_visibility="private")
        demo.unload(h.forget)
    return demo
