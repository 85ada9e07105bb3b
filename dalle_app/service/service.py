"""The Service: models, the four requests, fair turns (see the package docstring)."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Generator, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..engine import complete_text as engine_complete_text, cpu_step, generate_image_tokens, generate_in_chunks
from ..errors import RequestError
from ..images import load_image, psnr, to_pil, token_grid_picture
from ..outputs import OutputFolder, Retention, png_parameters
from .previews import PreviewThrottle
from .requests import MAX_IMAGES, Update, eta_text, keep_mask, resolve_seeds, validate_sampling
from .turns import Cancelled, Scheduler, in_fresh_thread, run_in_thread

NOT_STARTED = "stopped before it started"  # a request stopped before it computed anything (queue or turn)


class OutOfMemory(RequestError):
    """Even one image at a time does not fit in the device's memory."""


class Service:
    """The default model plus per-request models, the four requests, and fair scheduling. Thread-safe.

    concurrency: requests computing on the model at once (workers). max_active: requests started at once (each
    holds its cache while waiting for its next turn; default 4 per worker): the UI's queue should let this many
    requests reach the service. slice_s: how long one request computes before the next waiting one gets a turn.
    compile_step: sample with the torch.compile'd decoding step (see `generate_image_tokens`). retention: limits
    of the output folder (`dalle_app.outputs`); None = the environment's limits for the service's own temporary
    folder and none for a given `output_dir`, True = the environment's limits, False = none.
    """

    def __init__(self, reference: str | None = None, *, manager=None, output_dir: str | Path | None = None,
                 device=None, dtype=None, concurrency: int = 1, max_active: int | None = None,
                 slice_s: float = 0.1, heartbeat_s: float = 0.25, compile_step: bool = False,
                 retention: Retention | bool | None = None):
        from ..manager import BUILTIN_MODEL_DIR, ModelManager

        self.manager = manager or ModelManager(device=device, dtype=dtype)
        if retention is None or retention is True:
            retention = Retention.from_env() if output_dir is None or retention else None
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="dalle_app_"))
        self.outputs = OutputFolder(self.output_dir, retention or None)
        self.scheduler = Scheduler(concurrency, max_active, slice_s)
        self.heartbeat_s = heartbeat_s
        self.compile_step = compile_step
        self._lock = threading.Lock()
        self.default_reference = ""
        self.model = None
        self.set_default(reference or str(BUILTIN_MODEL_DIR))

    @property
    def concurrency(self) -> int:
        """Requests computing at once (workers)."""
        return self.scheduler.workers

    @property
    def max_active(self) -> int:
        """Requests the service interleaves at once; the UI's Gradio concurrency limit should equal this."""
        return self.scheduler.max_active

    # ------------------------------------------------------------------------------------------- models

    def get_model(self, reference: str | None = None):
        """The LoadedModel for `reference` (catalog name, Hub reference or local path; None = the default), loaded as
        a visitor's reference (`ModelManager.load(visitor=True)`: DALLE_APP_HUB / DALLE_APP_ALLOWED_REPOS apply)."""
        if reference is None or not str(reference).strip():
            return self.model
        from ..manager import Catalog

        reference = Catalog().get(str(reference).strip())
        with self._lock:
            if reference == self.default_reference:
                return self.model
        return in_fresh_thread(self.manager.load, reference, visitor=True)  # the deployment's policy applies

    def load(self, reference: str) -> dict:
        """Load a model (or take it from the cache) and return its info card; the default model is unchanged.

        Raises ModelLoadError / RequestError with one sentence."""
        if not reference or not str(reference).strip():
            raise RequestError("No model was given; choose a catalog model or enter a Hub reference or local path.")
        return self.get_model(reference).info()

    def set_default(self, reference: str) -> dict:
        """Make `reference` the model used by requests that name none; returns its info card."""
        if not reference or not str(reference).strip():
            raise RequestError("No model was given; choose a catalog model or enter a Hub reference or local path.")
        from ..manager import Catalog

        reference = Catalog().get(str(reference).strip())
        model = in_fresh_thread(self._load, reference)
        with self._lock:
            self.model, self.default_reference = model, reference
        return model.info()

    # ------------------------------------------------------------------------------------------- helpers

    def _load(self, reference: str):
        model = self.manager.load(reference)
        if next(model.dalle.parameters()).device.type == "cpu":
            cpu_step.library()  # build the C decoding step now (under a second, once per CPU), not in a request
        return model

    def _tokenize(self, m, prompt: str, length: int | None = None, allow_empty: bool = False):
        prompt = (prompt or "").strip()
        if not prompt and not allow_empty:
            raise RequestError("The prompt is empty; type a description such as 'a red circle on a blue background'.")
        length = length or m.dalle.text_seq_len
        notes = []
        try:
            text = m.tokenizer.tokenize([prompt], length)
        except ValueError:
            text = m.tokenizer.tokenize([prompt], length, truncate_text=True)
            kept = m.tokenizer.decode(text[0].tolist())
            notes.append(f"The prompt was cut to the model's {length} text tokens: '{kept}'.")
        return text, notes

    @staticmethod
    def _decode(m, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (b, I) -> images (b, c, s, s) in [0, 1]."""
        vae = m.vae
        with torch.no_grad():
            out = vae.decode(ids.to(m.device))
            out = vae.to_unit_range(out) if hasattr(vae, "to_unit_range") else out.clamp(0, 1)
        return out.float().cpu()

    def _preview(self, partial: torch.Tensor, m=None) -> list:
        """Decode the finished token rows of `partial` (b, done) alone (the VAEs are convolutional: a strip of rows
        decodes to a strip of pixels, at that fraction of a whole decode's cost); the rest of each picture is blank."""
        m = m or self.model
        side, size, rows = m.image_fmap_size, m.image_size, partial.shape[1] // m.image_fmap_size
        images = torch.full((partial.shape[0], 3, size, size), 0.9)
        if rows:
            strip = self._decode(m, partial[:, :rows * side].reshape(-1, rows, side))
            height = rows * size // side
            images[:, :, :height] = strip[:, :3, :height]
        return to_pil(images)

    @staticmethod
    def _encode(m, image) -> tuple[torch.Tensor, torch.Tensor]:
        """A user image -> (the image as the VAE sees it (1, 3, s, s) in [0, 1], its token ids (1, I))."""
        pil = load_image(image)
        size = m.image_size
        w, h = pil.size
        side = min(w, h)
        pil = pil.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        pil = pil.resize((size, size), resample=3)
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            ids = m.vae.get_codebook_indices(x.to(m.device, m.dtype))
        return x, ids.cpu()

    def _write(self, m, images, kind, prompt, seeds, settings, names=None) -> list[str]:
        """Save PNGs named time-request-kind-index-seed, held by the output folder until the request's last update
        has been taken (the caller releases them)."""
        params = [png_parameters(m, kind, prompt, seed, settings) for seed in seeds]
        return self.outputs.write(images, kind, params, names or [f"{i:02d}-seed{s}" for i, s in enumerate(seeds)])

    def _turns(self, work: Callable, should_stop: Callable[[], bool] | None) -> Generator[Update, None, object]:
        """Run work(emit, stop) in its own thread inside scheduler turns; yield its Updates (keep-alives while
        nothing happens) and return its value (None when cancelled): `value = yield from self._turns(...)`.
        Closing this generator cancels the work; so does a stop while it still waits for its first turn (after a
        final Update saying so)."""
        ticket = self.scheduler.ticket()
        user_stop = should_stop or (lambda: False)

        def stop() -> bool:
            return ticket.pause_point() or bool(user_stop())

        def job(emit):
            with ticket:
                return work(emit, stop)

        last_text = "waiting for the model"
        try:
            for item in run_in_thread(job, self.heartbeat_s):
                if item is None:
                    if not ticket.started and user_stop():  # Stop before its first turn: end without computing
                        yield Update(done=True, progress_text=NOT_STARTED,
                                     info={"completed": False, "stopped": NOT_STARTED})
                        return None
                    ahead = ticket.position()
                    text = last_text if ahead is None else (
                        f"waiting for the model ({ahead} request{'s' if ahead != 1 else ''} ahead)")
                    yield Update(progress_text=text, waiting=True)
                elif isinstance(item, Update):
                    last_text = item.progress_text or last_text
                    yield item
                else:  # ("result", value), the last item
                    return item[1]
        except Cancelled:
            return None
        finally:
            ticket.cancel()  # no-op when finished; stops the work when the consumer went away

    def _sample(self, m, text, options, seeds, should_stop, prime_ids=None, keep_mask=None, finish=None
                ) -> Generator[Update, None, object]:
        """Sample image tokens (chunked retry on out-of-memory) with previews; yield Updates and return
        (ImageTokens, finish(result) or None), None when cancelled. `finish` runs inside the turn (decoding,
        reranking)."""
        side, total, n = m.image_fmap_size, m.image_tokens, len(seeds)
        every = side * max(1, side // 8)
        index = {s: i for i, s in enumerate(seeds)}

        def work(emit, stop):
            finished: dict[int, list] = {}  # first row of a finished chunk -> its images (after an OOM split)
            throttle = PreviewThrottle()

            def chunk(dalle, text_rows, opts, *, seeds, progress=None, **kwargs):
                lo = index[seeds[0]]
                rows = len(seeds)
                if lo == 0:  # a new pass (the first, or a retry in smaller chunks)
                    finished.clear()

                def report(p):
                    shown = []
                    if throttle.due(p.elapsed):
                        t = time.perf_counter()
                        shown = [img for start in sorted(finished) if start < lo for img in finished[start]]
                        shown += self._preview(p.image_ids, m)
                        shown += [Image.new("RGB", (m.image_size,) * 2, (230, 230, 230))] * (n - lo - rows)
                        throttle.spent(time.perf_counter() - t)
                    rate = p.tokens_per_second
                    left = ((n - lo - rows) * total / max(rows, 1) + (total - p.done)) / rate if rate > 0 else None
                    emit(Update(images=shown, fraction=(lo * total + rows * p.done) / (n * total),
                                progress_text=eta_text(p.done, p.total, p.elapsed), tokens_per_s=round(rate, 1),
                                eta_s=round(left, 1) if left is not None else None))

                result = generate_image_tokens(dalle, text_rows, opts, seeds=seeds, progress=report,
                                               compile_step=self.compile_step, **kwargs)
                if result.completed and n > rows:
                    finished[lo] = to_pil(self._decode(m, result.image_ids))
                return result

            result = generate_in_chunks(m.dalle, text.repeat(n, 1), options, seeds=seeds, generate=chunk,
                                        prime_ids=prime_ids, keep_mask=keep_mask, progress_every=every,
                                        should_stop=stop)
            return result, (finish(result) if finish else None)

        try:
            return (yield from self._turns(work, should_stop))
        except MemoryError as err:
            raise OutOfMemory(str(err)) from None

    def _rerank(self, m, prompt: str, images: torch.Tensor) -> list[float]:
        clip = m.clip
        text, _ = self._tokenize(m, prompt, clip.text_seq_len)
        pixels = images.to(m.device, m.dtype)
        if pixels.shape[-1] != clip.image_size:
            pixels = F.interpolate(pixels, size=clip.image_size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            scores = clip(text.to(m.device).repeat(len(images), 1), pixels, return_loss=False)
        return [float(s) for s in scores.float().flatten()]

    # ------------------------------------------------------------------------------------------- requests

    def text_to_image(self, prompt: str, num_images=4, temperature=1.0, top_k=64, cond_scale=1.0, seed=-1, *,
                      top_p=None, model: str | None = None, rerank_keep: int = 0,
                      should_stop: Callable[[], bool] | None = None) -> Iterator[Update]:
        """Generate `num_images` images for `prompt`; with rerank_keep=M > 0 keep CLIP's best M of them."""
        count, options, seed = validate_sampling(num_images, temperature, top_k, cond_scale, seed, top_p=top_p)
        m = self.get_model(model)
        rerank_keep = int(rerank_keep or 0)
        if rerank_keep and m.clip is None:
            raise RequestError("This model has no CLIP reranker; turn reranking off.")
        if rerank_keep and not 1 <= rerank_keep <= count:
            raise RequestError(f"Keep-best must be between 1 and the number of images ({count}), got {rerank_keep}.")
        text, notes = self._tokenize(m, prompt)
        seeds = resolve_seeds(seed, count)
        settings = {"num_images": count, "temperature": options.temperature, "top_k": options.top_k,
                    "top_p": options.top_p, "cond_scale": options.cond_scale, "rerank_keep": rerank_keep}
        yield from self._finish_images(m, "text_to_image", prompt, text, options, seeds, settings, notes,
                                       should_stop, rerank_keep=rerank_keep)

    def _finish_images(self, m, kind, prompt, text, options, seeds, settings, notes, should_stop, rerank_keep=0,
                       prime_ids=None, keep_mask=None) -> Iterator[Update]:
        def finish(result):  # inside the turn: decode (and rerank) the finished tokens
            if not result.completed:
                return self._preview(result.image_ids, m), None
            images = self._decode(m, result.image_ids)
            if not rerank_keep:
                return to_pil(images), None
            scores = self._rerank(m, prompt, images)
            order = sorted(range(len(scores)), key=lambda i: -scores[i])[:rerank_keep]
            return to_pil(images[order]), (order, [round(scores[i], 4) for i in order])

        output = yield from self._sample(m, text, options, seeds, should_stop, prime_ids, keep_mask, finish)
        if output is None:  # cancelled: nobody is listening any more
            return
        result, (pil, ranked) = output
        used = list(result.seeds)
        info = {"seeds": used, "model": m.reference, "seconds": round(result.seconds, 3),
                "completed": result.completed,
                "tokens_per_second": round(result.image_ids.shape[1] / result.seconds, 1) if result.seconds > 0
                else None, "notes": notes + list(result.notes)}
        if ranked:
            used = [used[i] for i in ranked[0]]
            info["clip_scores"], info["seeds"] = ranked[1], used
        if not result.completed:
            info["notes"].append(f"Stopped after {result.image_ids.shape[1]} of {m.image_tokens} tokens; "
                                 "the images are partial.")
        files = self._write(m, pil, kind, prompt, used, {**settings, "completed": result.completed})
        try:
            yield Update(images=pil, files=files, info=info, fraction=1.0, done=True,
                         tokens_per_s=info["tokens_per_second"] or 0.0, eta_s=0.0,
                         progress_text=f"done in {result.seconds:.1f} s" if result.completed else "stopped")
        finally:
            self.outputs.release(files)

    def keep_mask(self, keep_rows, box=None, *, model: str | None = None) -> torch.Tensor:
        """(I,) bool: the first `keep_rows` token rows, plus the cells inside `box` = (left, top, right, bottom)
        given as fractions of the image in [0, 1]."""
        return keep_mask(self.get_model(model).image_fmap_size, keep_rows, box)

    def prime_image(self, image, prompt: str, keep_rows=4, num_images=4, temperature=1.0, top_k=64, cond_scale=1.0,
                    seed=-1, *, top_p=None, model: str | None = None, box=None,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[Update]:
        """Keep part of `image` (top rows and/or a box, in token cells) and let the model complete the rest.

        The first update's images are [the kept part]; completions follow as previews."""
        count, options, seed = validate_sampling(num_images, temperature, top_k, cond_scale, seed, top_p=top_p)
        m = self.get_model(model)
        text, notes = self._tokenize(m, prompt)
        mask = self.keep_mask(keep_rows, box, model=model)
        def kept_part():
            pixels, ids = self._encode(m, image)
            side, size = m.image_fmap_size, m.image_size
            cell_mask = mask.reshape(side, side).float()[None, None]
            return ids, to_pil(pixels * (0.35 + 0.65 * F.interpolate(cell_mask, size=size, mode="nearest")))

        ids, shown = in_fresh_thread(kept_part)
        yield Update(images=shown, progress_text="kept part")
        seeds = resolve_seeds(seed, count)
        settings = {"num_images": count, "temperature": options.temperature, "top_k": options.top_k,
                    "top_p": options.top_p, "cond_scale": options.cond_scale, "keep_rows": int(keep_rows),
                    "box": list(box) if box is not None else None}
        yield from self._finish_images(m, "prime_image", prompt, text, options, seeds, settings, notes, should_stop,
                                       prime_ids=ids.repeat(count, 1), keep_mask=mask)

    def reconstruct(self, image, *, model: str | None = None) -> Iterator[Update]:
        """Encode and decode `image` with the VAE: [resized input, reconstruction, token grid], usage and PSNR."""
        m = self.get_model(model)
        load_image(image)  # a clear error before waiting for a turn

        def work(emit, stop):
            start = time.perf_counter()
            pixels, ids = self._encode(m, image)
            return pixels, ids, self._decode(m, ids), time.perf_counter() - start

        out = yield from self._turns(work, None)
        if out is None:
            return
        pixels, ids, recon, seconds = out
        size = m.image_size
        num_tokens = int(getattr(m.vae, "num_tokens", 0)) or None
        used = int(ids.unique().numel())
        pictures = to_pil(pixels) + to_pil(recon) + [token_grid_picture(ids[0], size)]
        info = {"psnr_db": round(psnr(pixels, recon), 2), "codebook_used": used, "codebook_size": num_tokens,
                "codebook_usage": round(used / num_tokens, 4) if num_tokens else None, "model": m.reference,
                "tokens": int(ids.numel()), "image_size": size, "seconds": round(seconds, 3), "seeds": []}
        parts = ["input", "reconstruction", "token_grid"]
        files = self._write(m, pictures, "reconstruct", "", [None] * 3, {"part": parts}, names=parts)
        try:
            yield Update(images=pictures, files=files, info=info, done=True, fraction=1.0,
                         progress_text=f"PSNR {info['psnr_db']} dB · {used} codes used")
        finally:
            self.outputs.release(files)

    def complete_text(self, prompt: str, num_completions=4, temperature=1.0, top_k=64, seed=-1, *, top_p=None,
                      model: str | None = None, should_stop: Callable[[], bool] | None = None) -> Iterator[Update]:
        """Continue `prompt` (may be empty) `num_completions` times with the model's text head.

        should_stop is polled between tokens: the texts then end where they are ("completed": false)."""
        count, options, seed = validate_sampling(num_completions, temperature, top_k, 1.0, seed, top_p=top_p,
                                                 name="Number of completions")
        m = self.get_model(model)
        text, notes = self._tokenize(m, prompt, allow_empty=True)
        prefix = [t for t in text[0].tolist() if t != 0]
        seeds = resolve_seeds(seed, count)

        def work(emit, stop):
            start = time.perf_counter()
            return (engine_complete_text(m.dalle, [prefix] * count, options, seeds=seeds, should_stop=stop),
                    time.perf_counter() - start)

        out = yield from self._turns(work, should_stop)
        if out is None:
            return
        result, seconds = out
        pad = set(range(m.dalle.vocab_text, m.dalle.num_text_tokens))
        texts = [m.tokenizer.decode(row.tolist(), pad_tokens=pad) for row in result.token_ids.cpu()]
        done_text = f"done in {seconds:.1f} s" if result.completed else "stopped"
        yield Update(texts=texts, done=True, fraction=1.0, progress_text=done_text,
                     info={"seeds": list(result.seeds), "seconds": round(seconds, 3), "notes": notes,
                           "completions": texts, "model": m.reference, "top_p": options.top_p,
                           "completed": result.completed})

