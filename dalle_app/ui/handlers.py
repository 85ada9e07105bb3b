"""The UI's event handlers, kept apart from the layout so they can be unit-tested with any service object.

Each handler turns the service's stream of `Update`s into the values of the tab's output components. The model a
session uses is a reference string held in that session's gr.State (None = the service's default model) and passed
to every request as `model=`; switching models in one browser never changes another's.
"""

from __future__ import annotations

import html
import math
from contextlib import closing

import gradio as gr

from ..service import NOT_STARTED, RequestError, read_parameters
from .runs import Runs


def error_sentence(exc: Exception) -> str:
    """The one sentence a visitor sees for `exc` (never a traceback)."""
    from ..manager import ModelLoadError

    message = str(exc).strip()
    if isinstance(exc, (RequestError, ModelLoadError, ValueError, FileNotFoundError)):
        return message.splitlines()[0] if message else type(exc).__name__
    return f"The request failed ({type(exc).__name__}: {message.splitlines()[0] if message else ''})."


def error(exc: Exception) -> gr.Error:
    """A one-sentence gr.Error (never a traceback)."""
    return gr.Error(error_sentence(exc))


def top_p_value(top_p) -> float | None:
    """The slider's top-p as the service takes it: None (off) at 1 or when empty."""
    if top_p in (None, ""):
        return None
    top_p = float(top_p)
    return None if top_p >= 1.0 else top_p


def progress_html(update=None, *, idle: str = "", fraction: float | None = None) -> str:
    """A progress bar (HTML) for one Update: the fraction done (or `fraction`), tokens/s and the time left."""
    if update is None:
        return f'<div class="dalle-progress idle">{html.escape(idle)}</div>' if idle else ""
    fraction = getattr(update, "fraction", 0.0) if fraction is None else fraction
    fraction = min(1.0, max(0.0, float(fraction or 0.0)))
    rate = getattr(update, "tokens_per_s", None)
    eta = getattr(update, "eta_s", None)
    parts = [f"{fraction:.0%}"]
    if getattr(update, "done", False) or getattr(update, "waiting", False):
        parts = [getattr(update, "progress_text", "") or ("done" if update.done else "waiting for a turn")]
    else:
        if rate:
            parts.append(f"{rate:.0f} tokens/s")
        if eta is not None and math.isfinite(eta):
            parts.append(f"{eta:.1f} s left")
        text = getattr(update, "progress_text", "")
        if len(parts) == 1 and text:  # a service without rate fields: its own text says the same
            parts = [f"{fraction:.0%}", text]
    label = html.escape(" · ".join(parts))
    return (f'<div class="dalle-progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{fraction * 100:.0f}" style="position:relative;height:1.6em;border-radius:6px;'
            f'background:var(--neutral-200,#e5e7eb);overflow:hidden;margin:4px 0">'
            f'<div class="dalle-progress-fill" style="width:{fraction * 100:.1f}%;height:100%;'
            f'background:var(--color-accent,#f97316);transition:width .2s"></div>'
            f'<span style="position:absolute;inset:0;display:flex;align-items:center;justify-content:center;'
            f'font-size:.85em;color:var(--body-text-color,#111)">{label}</span></div>')


def _millions(count) -> str:
    return f"{count / 1e6:.1f} M" if count else "?"


def card_markdown(card: dict) -> str:
    """A short readable summary of a model's info card: size, images, VAE, tokenizer, reranker, device, dtype."""
    params = card.get("parameters") or {}
    image, vae, tok = card.get("image") or {}, card.get("vae") or {}, card.get("tokenizer") or {}
    side = image.get("fmap_size")
    parts = " · ".join(f"{name} {_millions(params[name])}" for name in ("dalle", "vae", "clip") if params.get(name))
    rows = [("Size", f"{_millions(params.get('total'))} parameters ({parts})" if parts else "?"),
            ("Images", f"{image.get('size', '?')} px, {side}×{side} = {image.get('tokens', '?')} tokens"),
            ("VAE", f"{vae.get('kind', '?')}, {vae.get('num_tokens', '?')} codes"),
            ("Tokenizer", f"{tok.get('kind') or tok.get('name', '?')}, {tok.get('vocab_size', '?')} tokens, prompts of "
                          f"{(card.get('hparams') or {}).get('text_seq_len', '?')} tokens"),
            ("CLIP reranker", "yes" if card.get("clip") else "no"),
            ("Runs on", f"{card.get('device', '?')}, {card.get('dtype', '?')}")]
    header = f"| Model | `{card.get('reference', '?')}` |"
    return "\n".join([header, "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


class ProgressBar:
    """The progress bar of one request. Keep-alives (`waiting`) keep the bar where it was: while the request waits
    for its turn they show the service's text (its place in line), while it computes they change nothing."""

    def __init__(self):
        self.fraction, self.text = 0.0, None

    def __call__(self, update):
        if getattr(update, "waiting", False):
            if update.progress_text == self.text:
                return gr.skip()
            return progress_html(update, fraction=self.fraction)
        self.fraction, self.text = update.fraction, update.progress_text
        return progress_html(update)


def _shown(update):
    """The gallery value of an update: the written PNGs (with their parameters), captioned with their seeds and CLIP
    scores, once done; else the previews. A keep-alive while waiting for a turn leaves the gallery as it is."""
    if getattr(update, "waiting", False) or not (update.images or update.files):
        return gr.skip()
    if not (update.done and update.files):
        return update.images
    seeds, scores = update.info.get("seeds") or [], update.info.get("clip_scores") or []
    captions = [" · ".join(([f"seed {seeds[i]}"] if i < len(seeds) else []) +
                           ([f"CLIP {scores[i]:.3f}"] if i < len(scores) else [])) or None
                for i in range(len(update.files))]
    return list(zip(update.files, captions))


def stream_updates(start, shown):
    """Yield shown(update) for each update of the request `start()`, with one-sentence errors. When the handler is
    abandoned (its browser tab closed), the request is closed too, so it gives up its turn on the model at once."""
    try:
        updates = start()
    except Exception as exc:  # noqa: BLE001
        raise error(exc) from None
    with closing(updates):
        try:
            for u in updates:
                yield shown(u)
        except Exception as exc:  # noqa: BLE001
            raise error(exc) from None


def _pick(gallery, index) -> str | None:
    """The file of gallery item `index` (the first when nothing is selected); None for an empty gallery."""
    items = list(gallery or [])
    if not items:
        return None
    index = index if isinstance(index, int) and 0 <= index < len(items) else 0
    item = items[index]
    if isinstance(item, (tuple, list)):
        item = item[0]
    if isinstance(item, dict):
        item = item.get("path") or (item.get("image") or {}).get("path")
    return getattr(item, "path", item)


def run_to_end(updates):
    """Run a service request to its end; return its final Update (errors as one-sentence gr.Error)."""
    last = None
    try:
        for last in updates:
            pass
    except Exception as exc:  # noqa: BLE001
        raise error(exc) from None
    return last


class Handlers:
    """The handlers of one app; `service` provides text_to_image, prime_image, reconstruct, complete_text, load."""

    def __init__(self, service):
        self.service = service
        self.runs = Runs()

    # ------------------------------------------------------------------------------------------- stopping

    @staticmethod
    def _key(request, tab: str) -> tuple[str, str]:
        return getattr(request, "session_hash", None) or "default", tab

    def _begin(self, tab: str, run, request):
        """should_stop for a request of `tab` whose run number (from the Generate step) is `run`."""
        key = self._key(request, tab)
        run = self.runs.start(key, run)
        return lambda: self.runs.stopped(key, run)

    def arm(self, request: gr.Request = None, tab: str = "t2i") -> int:
        """Generate's first, unqueued step: a new run number for this session's tab, passed on to the request."""
        return self.runs.arm(self._key(request, tab))

    def stop(self, request: gr.Request = None, tab: str = "t2i"):
        """Stop this session's request of `tab`. A queued one will not run at all: its progress bar says so at once.
        A running one returns its partial result within a token, and its own last update says "stopped"; the bar is
        left alone here (gr.skip()), as this answer could arrive after that update and hide it."""
        queued = self.runs.stop(self._key(request, tab))
        return progress_html(idle=NOT_STARTED) if queued else gr.skip()

    def cancel_if_queued(self, request: gr.Request = None, tab: str = "t2i"):
        """Stop's second step: while the request still waits in Gradio's queue, a new value (its run number) for the
        hidden signal whose change takes the request out of the queue; a running request is left alone (gr.skip())
        to return its partial result."""
        key = self._key(request, tab)
        return self.runs.latest(key) if self.runs.queued(key) else gr.skip()

    def controls(self, tab: str):
        """(arm, stop, cancel_if_queued) as Gradio event functions for one tab's Generate and Stop buttons."""
        def arm(request: gr.Request):
            return self.arm(request, tab)

        def stop(request: gr.Request):
            return self.stop(request, tab)

        def cancel_if_queued(request: gr.Request):
            return self.cancel_if_queued(request, tab)

        return arm, stop, cancel_if_queued

    def forget(self, request: gr.Request = None):
        """The session went away (its tab closed): forget its runs."""
        self.runs.forget(self._key(request, "")[0])

    # ------------------------------------------------------------------------------------------- tabs

    def text_to_image(self, model, prompt, num_images, temperature, top_k, top_p, cond_scale, seed, rerank, keep,
                      run=None, request: gr.Request = None):
        """Stream (gallery, progress bar, info, last seed) while the images are sampled; `run` is the number the
        Generate step armed (a request stopped before it started returns at once, computing nothing)."""
        should_stop, bar = self._begin("t2i", run, request), ProgressBar()
        if should_stop():
            yield gr.skip(), progress_html(idle=NOT_STARTED), gr.skip(), gr.skip()
            return

        def shown(u):
            seeds = u.info.get("seeds") if u.done else None
            return _shown(u), bar(u), u.info if u.done else gr.skip(), seeds[0] if seeds else gr.skip()

        yield from stream_updates(lambda: self.service.text_to_image(
            prompt, num_images, temperature, top_k, cond_scale, seed, top_p=top_p_value(top_p), model=model or None,
            rerank_keep=int(keep) if rerank else 0, should_stop=should_stop), shown)

    def prime_image(self, model, image, prompt, keep_rows, use_box, left, top, right, bottom, num_images,
                    temperature, top_k, top_p, cond_scale, seed, run=None, request: gr.Request = None):
        """Stream (completions, progress bar, info, kept part); the service's first update is the kept part."""
        box = (left, top, right, bottom) if use_box else None
        should_stop, first, bar = self._begin("prime", run, request), [True], ProgressBar()
        if should_stop():
            yield gr.skip(), progress_html(idle=NOT_STARTED), gr.skip(), gr.skip()
            return

        def shown(u):
            if first[0] and u.images and not u.done:
                first[0] = False
                return gr.skip(), bar(u), gr.skip(), u.images[0]
            return _shown(u), bar(u), u.info if u.done else gr.skip(), gr.skip()

        yield from stream_updates(lambda: self.service.prime_image(
            image, prompt, keep_rows, num_images, temperature, top_k, cond_scale, seed, top_p=top_p_value(top_p),
            model=model or None, box=box, should_stop=should_stop), shown)

    def reconstruct(self, model, image):
        """(input as the VAE sees it, reconstruction, token grid) and the PSNR/codebook info."""
        last = run_to_end(self.service.reconstruct(image, model=model or None))
        return last.files, last.info

    def complete_text(self, model, prompt, num_completions, temperature, top_k, top_p, seed,
                      run=None, request: gr.Request = None):
        """Stream (completions text, progress bar, info)."""
        should_stop, bar = self._begin("text", run, request), ProgressBar()
        if should_stop():
            yield gr.skip(), progress_html(idle=NOT_STARTED), gr.skip()
            return

        def shown(u):
            return "\n".join(u.texts) if u.texts else gr.skip(), bar(u), u.info if u.done else gr.skip()

        yield from stream_updates(lambda: self.service.complete_text(
            prompt, num_completions, temperature, top_k, seed, top_p=top_p_value(top_p), model=model or None,
            should_stop=should_stop), shown)

    # ------------------------------------------------------------------------------------------- model panel

    def load_model(self, choice, reference, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - Gradio's way
        """Load the chosen model for this session only: (a status line, its card as Markdown and as JSON, the
        session's model reference, the rerank checkbox and the rows-to-keep slider fitted to the model). Hub
        downloads show their progress bars (huggingface_hub's tqdm) in the panel.

        A model that cannot be loaded leaves the session on its model and says why in the status line, beside the
        button: an error toast would cover the button for its ten seconds."""
        from ..manager import Catalog

        try:
            ref = (reference or "").strip() or Catalog().get(choice or "")
            if not ref:
                raise RequestError("No model was given; choose a catalog model or enter a Hub reference or local path.")
            card = self.service.load(ref)
        except Exception as exc:  # noqa: BLE001
            sentence = html.escape(error_sentence(exc))
            status = f'<div class="model-error" style="color:#b91c1c">Not loaded: {sentence}</div>'
            return (status, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        side = (card.get("image") or {}).get("fmap_size") or 16
        rerank = gr.Checkbox(interactive=True) if card.get("clip") else gr.Checkbox(interactive=False, value=False)
        return (f"Loaded `{ref}` for your requests.", card_markdown(card), card, ref, rerank,
                gr.Slider(maximum=side, value=side // 2))

    # ------------------------------------------------------------------------------------------- small controls

    @staticmethod
    def catalog_reference(choice):
        """The reference of a catalog entry, for the reference box (nothing changes when the choice is cleared)."""
        from ..manager import Catalog

        return Catalog().get(choice) if choice else gr.skip()

    @staticmethod
    def select(evt: gr.SelectData):
        """The index of the gallery image the user clicked."""
        return evt.index

    @staticmethod
    def send_to_priming(gallery, index, prompt):
        """Fill the priming tab with the selected (or first) gallery image and the prompt, and switch to it."""
        path = _pick(gallery, index)
        if path is None:
            raise gr.Error("The gallery is empty; generate images first, then pick one to send.")
        return path, prompt, gr.Tabs(selected="prime")

    # what `restore` fills, in order: the text-to-image controls, the parameters view, the priming controls, the tab
    RESTORED = ("prompt", "num_images", "temperature", "top_k", "top_p", "cond_scale", "seed", "parameters",
                "prime_image", "prime_prompt", "keep_rows", "use_box", "box_left", "box_top", "box_right",
                "box_bottom", "prime_num_images", "prime_temperature", "prime_top_k", "prime_top_p",
                "prime_cond_scale", "prime_seed", "tab")

    @staticmethod
    def restore(file) -> tuple:
        """Read a PNG's parameters back into the controls of the tab that made it, and show them.

        Returns one value per name of `RESTORED`; the other tab's controls get gr.skip(). A priming PNG becomes the
        priming input itself (its kept part is the original's as the VAE drew it) and selects the priming tab."""
        try:
            p = read_parameters(file)
        except Exception as exc:  # noqa: BLE001
            raise error(exc) from None
        s = p.get("settings", {})
        sampling = {"num_images": s.get("num_images", 4), "temperature": s.get("temperature", 1.0),
                    "top_k": s.get("top_k") or 0, "top_p": s.get("top_p") or 1.0,
                    "cond_scale": s.get("cond_scale", 1.0), "seed": p.get("seed", -1)}
        values = dict.fromkeys(Handlers.RESTORED, gr.skip())
        values["parameters"] = p
        if p.get("kind") != "prime_image":
            values.update(sampling, prompt=p.get("prompt", ""))
        else:
            values.update({f"prime_{name}": value for name, value in sampling.items()})
            box = s.get("box")
            if box and len(box) == 4:
                values.update(zip(("box_left", "box_top", "box_right", "box_bottom"), box))
            values.update(prime_image=file if isinstance(file, str) else getattr(file, "name", file),
                          prime_prompt=p.get("prompt", ""), keep_rows=s.get("keep_rows", 0), use_box=bool(box),
                          tab=gr.Tabs(selected="prime"))
        return tuple(values[name] for name in Handlers.RESTORED)
