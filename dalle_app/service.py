"""What the app and the CLI do, without any UI: validate requests, run the engine, write PNGs with their settings.

    service = Service("weights/shapes-dalle")
    for update in service.text_to_image("a red circle", num_images=4, seed=0):
        update.images, update.progress_text     # previews while sampling; the last update has update.files
    read_parameters(update.files[0])             # {"model": ..., "prompt": ..., "seed": ..., "settings": {...}}

Each request is a generator of `Update`s: previews (partial images: rows decoded so far, the rest blank) and a
final one with `done=True`, the PNG paths and an `info` dict (seeds used, timing, notes).
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .engine import complete_text as engine_complete_text, generate_image_tokens
from .service_utils import (MAX_IMAGES, RequestError, Update, _eta_text, _stream, load_image, psnr, read_parameters,
                            resolve_seeds, save_png, to_pil, token_grid_picture, validate_sampling)

__all__ = ["MAX_IMAGES", "RequestError", "Service", "Update", "read_parameters", "validate_sampling"]


class Service:
    """One loaded model (switchable) plus the four requests. Thread-safe for model switches."""

    def __init__(self, reference: str | None = None, *, manager=None, output_dir: str | Path | None = None,
                 device=None, dtype=None):
        from .manager import BUILTIN_MODEL_DIR, ModelManager

        self.manager = manager or ModelManager(device=device, dtype=dtype)
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="dalle_app_"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.model = None
        self.load(reference or str(BUILTIN_MODEL_DIR))

    def load(self, reference: str) -> dict:
        """Load (or switch to) a model; returns its info card. Raises ModelLoadError/ValueError with one sentence."""
        if not reference or not str(reference).strip():
            raise RequestError("No model was given; choose a catalog model or enter a Hub reference or local path.")
        model = self.manager.load(str(reference).strip())
        with self._lock:
            self.model = model
        return model.info()

    # ------------------------------------------------------------------------------------------- helpers

    def _tokenize(self, prompt: str, length: int | None = None, allow_empty: bool = False):
        model = self.model
        prompt = (prompt or "").strip()
        if not prompt and not allow_empty:
            raise RequestError("The prompt is empty; type a description such as 'a red circle on a blue background'.")
        length = length or model.dalle.text_seq_len
        notes = []
        try:
            text = model.tokenizer.tokenize([prompt], length)
        except ValueError:
            text = model.tokenizer.tokenize([prompt], length, truncate_text=True)
            kept = model.tokenizer.decode(text[0].tolist())
            notes.append(f"The prompt was cut to the model's {length} text tokens: '{kept}'.")
        return text, notes

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (b, I) -> images (b, c, s, s) in [0, 1]."""
        vae = self.model.vae
        with torch.no_grad():
            out = vae.decode(ids.to(self.model.device))
            out = vae.to_unit_range(out) if hasattr(vae, "to_unit_range") else out.clamp(0, 1)
        return out.float().cpu()

    def _preview(self, partial: torch.Tensor) -> list:
        """Decode the finished token rows of `partial` (b, done); blank the rest of each picture."""
        model = self.model
        side, size, done = model.image_fmap_size, model.image_size, partial.shape[1]
        full = torch.zeros(partial.shape[0], model.image_tokens, dtype=torch.long)
        full[:, :done] = partial.cpu()
        images = self._decode(full)
        rows_px = (done // side) * size // side
        images[:, :, rows_px:] = 0.9
        return to_pil(images)

    def _encode(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """A user image -> (the image as the VAE sees it (1, 3, s, s) in [0, 1], its token ids (1, I))."""
        pil = load_image(image)
        size = self.model.image_size
        w, h = pil.size
        side = min(w, h)
        pil = pil.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        pil = pil.resize((size, size), resample=3)
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            ids = self.model.vae.get_codebook_indices(x.to(self.model.device, self.model.dtype))
        return x, ids.cpu()

    def _parameters(self, kind: str, prompt: str, seed, settings: dict) -> dict:
        model = self.model
        commit = next((f.commit or f.revision for f in model.files if getattr(f, "commit", None) or
                       getattr(f, "revision", None)), None)
        return {"app": "dalle_app", "kind": kind, "model": model.reference, "revision": commit, "prompt": prompt,
                "seed": seed, "settings": settings}

    def _write(self, images, kind, prompt, seeds, settings) -> list[str]:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        files = []
        for i, (image, seed) in enumerate(zip(images, seeds)):
            path = self.output_dir / f"{stamp}-{kind}-{i:02d}-{seed}.png"
            files.append(save_png(image, path, self._parameters(kind, prompt, seed, settings)))
        return files

    def _sample(self, text, options, seeds, should_stop, prime_ids=None, keep_mask=None) -> Iterator[Update]:
        """Run the engine in a thread; yield preview Updates, finally ("result", ImageTokens)."""
        model = self.model
        side = model.image_fmap_size
        every = side * max(1, side // 8)
        for item in _stream(generate_image_tokens, dalle=model.dalle, text=text.repeat(len(seeds), 1),
                            options=options, seeds=seeds, prime_ids=prime_ids, keep_mask=keep_mask,
                            progress_every=every, should_stop=should_stop):
            if isinstance(item, tuple):
                yield item
            else:
                yield Update(images=self._preview(item.image_ids), fraction=item.done / item.total,
                             progress_text=_eta_text(item.done, item.total, item.elapsed))

    def _rerank(self, prompt: str, images: torch.Tensor) -> list[float]:
        clip = self.model.clip
        text, _ = self._tokenize(prompt, clip.text_seq_len)
        pixels = images.to(self.model.device, self.model.dtype)
        if pixels.shape[-1] != clip.image_size:
            pixels = F.interpolate(pixels, size=clip.image_size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            scores = clip(text.to(self.model.device).repeat(len(images), 1), pixels, return_loss=False)
        return [float(s) for s in scores.float().flatten()]

    # ------------------------------------------------------------------------------------------- requests

    def text_to_image(self, prompt: str, num_images=4, temperature=1.0, top_k=64, cond_scale=1.0, seed=-1, *,
                      rerank_keep: int = 0, should_stop: Callable[[], bool] | None = None) -> Iterator[Update]:
        """Generate `num_images` images for `prompt`; with rerank_keep=M > 0 keep CLIP's best M of them."""
        count, options, seed = validate_sampling(num_images, temperature, top_k, cond_scale, seed)
        rerank_keep = int(rerank_keep or 0)
        if rerank_keep and self.model.clip is None:
            raise RequestError("This model has no CLIP reranker; turn reranking off.")
        if rerank_keep and not 1 <= rerank_keep <= count:
            raise RequestError(f"Keep-best must be between 1 and the number of images ({count}), got {rerank_keep}.")
        text, notes = self._tokenize(prompt)
        seeds = resolve_seeds(seed, count)
        settings = {"num_images": count, "temperature": options.temperature, "top_k": options.top_k,
                    "cond_scale": options.cond_scale, "rerank_keep": rerank_keep}
        yield from self._finish_images("text_to_image", prompt, text, options, seeds, settings, notes, should_stop,
                                       rerank_keep=rerank_keep)

    def _finish_images(self, kind, prompt, text, options, seeds, settings, notes, should_stop, rerank_keep=0,
                       prime_ids=None, keep_mask=None) -> Iterator[Update]:
        result = None
        for item in self._sample(text, options, seeds, should_stop, prime_ids, keep_mask):
            if isinstance(item, tuple):
                result = item[1]
            else:
                yield item
        ids, used = result.image_ids, list(result.seeds)
        info = {"seeds": used, "seconds": round(result.seconds, 3), "completed": result.completed,
                "tokens_per_second": round(ids.shape[1] / result.seconds, 1) if result.seconds > 0 else None,
                "notes": notes + list(result.notes)}
        if result.completed:
            images = self._decode(ids)
            if rerank_keep:
                scores = self._rerank(prompt, images)
                order = sorted(range(len(scores)), key=lambda i: -scores[i])[:rerank_keep]
                images, used = images[order], [used[i] for i in order]
                info["clip_scores"] = [round(scores[i], 4) for i in order]
                info["seeds"] = used
            pil = to_pil(images)
        else:
            pil = self._preview(ids)
            info["notes"].append(f"Stopped after {ids.shape[1]} of {self.model.image_tokens} tokens; "
                                 "the images are partial.")
        files = self._write(pil, kind, prompt, used, {**settings, "completed": result.completed})
        yield Update(images=pil, files=files, info=info, fraction=1.0, done=True,
                     progress_text=f"done in {result.seconds:.1f} s" if result.completed else "stopped")

    def keep_mask(self, keep_rows, box=None) -> torch.Tensor:
        """(I,) bool: the first `keep_rows` token rows, plus the cells inside `box` = (left, top, right, bottom)
        given as fractions of the image in [0, 1]."""
        side = self.model.image_fmap_size
        rows = _number_rows(keep_rows, side)
        mask = torch.zeros(side, side, dtype=torch.bool)
        mask[:rows] = True
        if box is not None and any(v is not None for v in box):
            try:
                left, top, right, bottom = (float(v) for v in box)
            except (TypeError, ValueError):
                raise RequestError("The keep box needs four numbers: left, top, right, bottom.") from None
            if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
                raise RequestError("The keep box must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1.")
            mask[math.floor(top * side):math.ceil(bottom * side), math.floor(left * side):math.ceil(right * side)] = True
        return mask.flatten()

    def prime_image(self, image, prompt: str, keep_rows=4, num_images=4, temperature=1.0, top_k=64, cond_scale=1.0,
                    seed=-1, *, box=None, should_stop: Callable[[], bool] | None = None) -> Iterator[Update]:
        """Keep part of `image` (top rows and/or a box, in token cells) and let the model complete the rest.

        The first update's images are [the kept part]; completions follow as previews."""
        count, options, seed = validate_sampling(num_images, temperature, top_k, cond_scale, seed)
        text, notes = self._tokenize(prompt)
        pixels, ids = self._encode(image)
        mask = self.keep_mask(keep_rows, box)
        side, size = self.model.image_fmap_size, self.model.image_size
        cell_mask = mask.reshape(side, side).float()[None, None]
        shown = pixels * (0.35 + 0.65 * F.interpolate(cell_mask, size=size, mode="nearest"))
        yield Update(images=to_pil(shown), progress_text="kept part")
        seeds = resolve_seeds(seed, count)
        settings = {"num_images": count, "temperature": options.temperature, "top_k": options.top_k,
                    "cond_scale": options.cond_scale, "keep_rows": int(keep_rows),
                    "box": list(box) if box is not None else None}
        yield from self._finish_images("prime_image", prompt, text, options, seeds, settings, notes, should_stop,
                                       prime_ids=ids.repeat(count, 1), keep_mask=mask)

    def reconstruct(self, image) -> Iterator[Update]:
        """Encode and decode `image` with the VAE: [resized input, reconstruction, token grid], usage and PSNR."""
        start = time.perf_counter()
        pixels, ids = self._encode(image)
        recon = self._decode(ids)
        size = self.model.image_size
        num_tokens = int(getattr(self.model.vae, "num_tokens", 0)) or None
        used = int(ids.unique().numel())
        pictures = to_pil(pixels) + to_pil(recon) + [token_grid_picture(ids[0], size)]
        info = {"psnr_db": round(psnr(pixels, recon), 2), "codebook_used": used, "codebook_size": num_tokens,
                "codebook_usage": round(used / num_tokens, 4) if num_tokens else None,
                "tokens": int(ids.numel()), "image_size": size, "seconds": round(time.perf_counter() - start, 3),
                "seeds": []}
        files = self._write(pictures, "reconstruct", "", [None, None, None],
                            {"part": ["input", "reconstruction", "token_grid"]})
        yield Update(images=pictures, files=files, info=info, done=True, fraction=1.0,
                     progress_text=f"PSNR {info['psnr_db']} dB · {used} codes used")

    def complete_text(self, prompt: str, num_completions=4, temperature=1.0, top_k=64, seed=-1) -> Iterator[Update]:
        """Continue `prompt` (may be empty) `num_completions` times with the model's text head."""
        count, options, seed = validate_sampling(num_completions, temperature, top_k, 1.0, seed,
                                                 name="Number of completions")
        text, notes = self._tokenize(prompt, allow_empty=True)
        prefix = [t for t in text[0].tolist() if t != 0]
        seeds = resolve_seeds(seed, count)
        start = time.perf_counter()
        result = engine_complete_text(self.model.dalle, [prefix] * count, options, seeds=seeds)
        dalle = self.model.dalle
        pad = set(range(dalle.vocab_text, dalle.num_text_tokens))
        texts = [self.model.tokenizer.decode(row.tolist(), pad_tokens=pad) for row in result.token_ids.cpu()]
        seconds = time.perf_counter() - start
        yield Update(texts=texts, done=True, fraction=1.0, progress_text=f"done in {seconds:.1f} s",
                     info={"seeds": list(result.seeds), "seconds": round(seconds, 3), "notes": notes,
                           "completions": texts})


def _number_rows(keep_rows, side: int) -> int:
    try:
        rows = float(keep_rows)
    except (TypeError, ValueError):
        raise RequestError(f"Rows to keep must be a number, got {keep_rows!r}.") from None
    if rows != int(rows) or not 0 <= rows <= side:
        raise RequestError(f"Rows to keep must be a whole number between 0 and {side}, got {keep_rows}.")
    return int(rows)

