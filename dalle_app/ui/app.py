"""The Gradio Blocks app: four tabs, a model panel, named API endpoints. All work is done by `dalle_app.service`."""

from __future__ import annotations

import random

import gradio as gr

from ..service import MAX_IMAGES, RequestError, Service, read_parameters

GPU = "gpu"  # one concurrency group for everything that runs the model


def _error(exc: Exception) -> gr.Error:
    """A one-sentence gr.Error (never a traceback)."""
    from ..manager import ModelLoadError

    if isinstance(exc, (RequestError, ModelLoadError, ValueError, FileNotFoundError)):
        return gr.Error(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return gr.Error(f"The request failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).")


def checked_image(**kwargs) -> gr.Image:
    """A gr.Image whose upload check answers in one sentence (Gradio's own wraps PIL's error in a long generic text).

    The check is set on the instance: a gr.Image subclass would make Gradio write a .pyi file next to this module."""
    from ..service_utils import load_image

    image = gr.Image(**kwargs)
    original = image.preprocess

    def preprocess(payload):
        path = getattr(payload, "path", None)
        try:
            if path:
                load_image(path)  # opens lazily and refuses huge images before they are decoded
            return original(payload)
        except Exception as exc:  # noqa: BLE001
            raise _error(exc if isinstance(exc, RequestError) else RequestError(
                "The image could not be read; upload a PNG, JPEG or WebP picture.")) from None

    image.preprocess = preprocess
    return image


def _finish(updates):
    """Run a service request to its end; return (files or texts, info)."""
    last = None
    try:
        for last in updates:
            pass
    except gr.Error:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _error(exc) from None
    return last


def example_prompts(count: int = 6, seed: int = 0) -> list[str]:
    """Captions from the shapes world (what the built-in model was trained on)."""
    from ..world import caption, sample_scene

    rng = random.Random(seed)
    return [caption(sample_scene(rng), rng) for _ in range(count)]


def build_demo(service: Service, *, concurrency: int = 1) -> gr.Blocks:
    """The app's Blocks; call `.queue(...)` and `.launch(...)` on it."""
    stop_flags: dict[str, bool] = {}

    def stopper(request: gr.Request | None):
        key = getattr(request, "session_hash", None) or "default"
        stop_flags[key] = False
        return key, (lambda: stop_flags.get(key, False))

    def stop(request: gr.Request):
        stop_flags[getattr(request, "session_hash", None) or "default"] = True
        return "stopping..."

    def stream(updates, extra=lambda u: ()):
        try:
            for u in updates:
                yield (u.images, u.progress_text, u.info if u.done else gr.skip(), *extra(u))
        except Exception as exc:  # noqa: BLE001
            raise _error(exc) from None

    # ---------------------------------------------------------------- UI handlers (richer than the API)
    def t2i_ui(prompt, num_images, temperature, top_k, cond_scale, seed, rerank, keep, request: gr.Request):
        _, should_stop = stopper(request)
        updates = service.text_to_image(prompt, num_images, temperature, top_k, cond_scale, seed,
                                        rerank_keep=int(keep) if rerank else 0, should_stop=should_stop)
        yield from stream(updates, lambda u: (u.info["seeds"][0] if u.done and u.info.get("seeds") else gr.skip(),))

    def prime_ui(image, prompt, keep_rows, use_box, left, top, right, bottom, num_images, temperature, top_k,
                 cond_scale, seed, request: gr.Request):
        _, should_stop = stopper(request)
        box = (left, top, right, bottom) if use_box else None
        first = True
        try:
            for u in service.prime_image(image, prompt, keep_rows, num_images, temperature, top_k, cond_scale, seed,
                                         box=box, should_stop=should_stop):
                if first:
                    first = False
                    yield gr.skip(), u.progress_text, gr.skip(), u.images[0]
                else:
                    yield u.images, u.progress_text, u.info if u.done else gr.skip(), gr.skip()
        except Exception as exc:  # noqa: BLE001
            raise _error(exc) from None

    # ---------------------------------------------------------------- API endpoints (exact parameter names)
    def text_to_image(prompt, num_images, temperature, top_k, cond_scale, seed):
        last = _finish(service.text_to_image(prompt, num_images, temperature, top_k, cond_scale, seed))
        return last.files, last.info

    def prime_image(image, prompt, keep_rows, num_images, temperature, top_k, cond_scale, seed):
        last = _finish(service.prime_image(image, prompt, keep_rows, num_images, temperature, top_k, cond_scale,
                                           seed))
        return last.files, last.info

    def reconstruct(image):
        last = _finish(service.reconstruct(image))
        return last.files, last.info

    def complete_text(prompt, num_completions, temperature, top_k, seed):
        last = _finish(service.complete_text(prompt, num_completions, temperature, top_k, seed))
        return "\n".join(last.texts), last.info

    def load_model(choice, reference):
        from ..manager import Catalog

        ref = (reference or "").strip() or Catalog().get(choice or "")
        try:
            return service.load(ref)
        except Exception as exc:  # noqa: BLE001
            raise _error(exc) from None

    def restore(file):
        try:
            p = read_parameters(file)
        except Exception as exc:  # noqa: BLE001
            raise _error(exc) from None
        s = p.get("settings", {})
        return (p.get("prompt", ""), s.get("num_images", 4), s.get("temperature", 1.0), s.get("top_k") or 0,
                s.get("cond_scale", 1.0), p.get("seed", -1), p)

    model = service.model
    side = model.image_fmap_size
    with gr.Blocks(title="dalle_app", analytics_enabled=False) as demo:
        gr.Markdown("# dalle_app\nDALLE-pytorch models: text to image, priming, VAE reconstruction, text completion.")
        last_seed = gr.State(-1)
        with gr.Accordion("Model", open=False):
            with gr.Row():
                from ..manager import Catalog
                catalog_choice = gr.Dropdown(Catalog().names(), label="Catalog model", value=None)
                model_ref = gr.Textbox(label="Hub reference or local path", value=model.reference,
                                       placeholder="owner/name[@revision] or weights/folder")
                load_btn = gr.Button("Load model")
            model_card = gr.JSON(value=model.info(), label="Model card")
        with gr.Tabs():
            with gr.Tab("Text to image", id="t2i"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", lines=1, placeholder="a red circle on a blue background")
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                        num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
                        temperature = gr.Slider(0.05, 3.0, value=1.0, step=0.05, label="Temperature")
                        top_k = gr.Number(value=64, precision=0, minimum=0, label="Top-k (0 = all)")
                        cond_scale = gr.Slider(0.0, 10.0, value=1.0, step=0.5, label="Guidance scale (1 = off)")
                        with gr.Row():
                            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", scale=3)
                            random_btn = gr.Button("🎲", scale=1, min_width=40)
                            reuse_btn = gr.Button("♻️", scale=1, min_width=40)
                        with gr.Row():
                            rerank = gr.Checkbox(label="CLIP rerank", value=False,
                                                 interactive=model.clip is not None)
                            keep = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Keep best M")
                        gr.Examples([[p] for p in example_prompts()], inputs=[prompt])
                    with gr.Column():
                        gallery = gr.Gallery(label="Images", format="png", columns=4, elem_id="gallery")
                        progress = gr.Markdown(elem_id="progress")
                        info = gr.JSON(label="Seeds and timing", elem_id="info")
                        with gr.Accordion("Read parameters from a PNG", open=False):
                            png_file = gr.File(label="PNG written by this app", file_types=[".png"])
                            png_params = gr.JSON(label="Parameters")
            with gr.Tab("Image priming", id="prime"):
                with gr.Row():
                    with gr.Column():
                        prime_input = checked_image(type="filepath", label="Image", format="png")
                        prime_prompt = gr.Textbox(label="Prompt")
                        keep_rows = gr.Slider(0, side, value=side // 2, step=1, label="Token rows to keep (top)")
                        use_box = gr.Checkbox(label="Also keep a box (fractions of the image)")
                        with gr.Row():
                            box = [gr.Number(v, label=n, minimum=0, maximum=1) for n, v in
                                   (("left", 0.0), ("top", 0.5), ("right", 0.5), ("bottom", 1.0))]
                        prime_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
                        prime_temp = gr.Slider(0.05, 3.0, value=1.0, step=0.05, label="Temperature")
                        prime_topk = gr.Number(value=64, precision=0, minimum=0, label="Top-k (0 = all)")
                        prime_cond = gr.Slider(0.0, 10.0, value=1.0, step=0.5, label="Guidance scale")
                        prime_seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                        with gr.Row():
                            prime_btn = gr.Button("Complete image", variant="primary")
                            prime_stop = gr.Button("Stop", variant="stop")
                    with gr.Column():
                        kept = gr.Image(label="Kept part", format="png")
                        prime_gallery = gr.Gallery(label="Completions", format="png", columns=4)
                        prime_progress = gr.Markdown()
                        prime_info = gr.JSON(label="Seeds and timing")
            with gr.Tab("VAE reconstruction", id="vae"):
                with gr.Row():
                    with gr.Column():
                        vae_input = checked_image(type="filepath", label="Image", format="png")
                        vae_btn = gr.Button("Reconstruct", variant="primary")
                    with gr.Column():
                        vae_gallery = gr.Gallery(label="Input as the VAE sees it · reconstruction · token grid",
                                                 format="png", columns=3)
                        vae_info = gr.JSON(label="PSNR and codebook usage")
            with gr.Tab("Text completion", id="text"):
                with gr.Row():
                    with gr.Column():
                        text_prompt = gr.Textbox(label="Prompt prefix", placeholder="a small red")
                        text_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of completions")
                        text_temp = gr.Slider(0.05, 3.0, value=1.0, step=0.05, label="Temperature")
                        text_topk = gr.Number(value=64, precision=0, minimum=0, label="Top-k (0 = all)")
                        text_seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                        text_btn = gr.Button("Complete", variant="primary")
                    with gr.Column():
                        completions = gr.Textbox(label="Completions", lines=8)
                        text_info = gr.JSON(label="Seeds and timing")

        t2i_inputs = [prompt, num_images, temperature, top_k, cond_scale, seed]
        ui = dict(concurrency_id=GPU, concurrency_limit=concurrency, api_visibility="private")
        for trigger in (generate_btn.click, prompt.submit):
            trigger(t2i_ui, t2i_inputs + [rerank, keep], [gallery, progress, info, last_seed], **ui)
        stop_btn.click(stop, None, progress, queue=False, api_visibility="private")
        prime_stop.click(stop, None, prime_progress, queue=False, api_visibility="private")
        random_btn.click(lambda: -1, None, seed, queue=False, api_visibility="private")
        reuse_btn.click(lambda s: s, last_seed, seed, queue=False, api_visibility="private")
        png_file.upload(restore, png_file, t2i_inputs + [png_params], api_visibility="private")
        prime_btn.click(prime_ui, [prime_input, prime_prompt, keep_rows, use_box, *box, prime_n, prime_temp,
                                   prime_topk, prime_cond, prime_seed],
                        [prime_gallery, prime_progress, prime_info, kept], **ui)
        load_btn.click(load_model, [catalog_choice, model_ref], model_card, concurrency_id=GPU,
                       concurrency_limit=concurrency, api_visibility="private")

        # named endpoints with the documented parameter names; the last two tabs use them directly
        api = dict(concurrency_id=GPU, concurrency_limit=concurrency)
        hidden = gr.Button(visible=False)
        api_files = gr.Gallery(visible=False, format="png")
        api_info = gr.JSON(visible=False)
        hidden.click(text_to_image, t2i_inputs, [api_files, api_info], api_name="text_to_image", **api)
        hidden2 = gr.Button(visible=False)
        hidden2.click(prime_image, [prime_input, prime_prompt, keep_rows, prime_n, prime_temp, prime_topk,
                                    prime_cond, prime_seed], [api_files, api_info], api_name="prime_image", **api)
        vae_btn.click(reconstruct, vae_input, [vae_gallery, vae_info], api_name="reconstruct", **api)
        text_btn.click(complete_text, [text_prompt, text_n, text_temp, text_topk, text_seed],
                       [completions, text_info], api_name="complete_text", **api)
    return demo
