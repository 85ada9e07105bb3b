"""What the app and the CLI do, without any UI: validate requests, run the engine fairly, write PNGs with settings.

    service = Service("weights/shapes-dalle")            # the default model; concurrency=1 GPU worker
    for update in service.text_to_image("a red circle", num_images=4, seed=0, model=None):
        update.images, update.progress_text, update.fraction, update.tokens_per_s, update.eta_s
    read_parameters(update.files[0])                     # {"model": ..., "prompt": ..., "seed": ..., "settings": {...}}

Each request is a generator of `Update`s: previews (partial images: rows decoded so far, the rest blank),
keep-alives (`waiting=True`, no images: keep what is shown) while the request waits for its turn on the model,
and a final one with `done=True`, the PNG paths and an `info` dict (seeds used, timing, notes).

Every request takes `model=` (a catalog name, Hub reference or local path; None = the default model), so users
of one app can each use their own model; models come from the manager's LRU cache.

Requests share the model through a `Scheduler`: `concurrency` requests compute at once, each for a short slice
before the next waiting request gets its turn, so a large request does not starve a small one. Closing a request's
generator (Gradio does this when the client disconnects or presses Stop) cancels it at the next token.
"""

from ..errors import RequestError
from ..outputs import read_parameters, save_png
from .requests import MAX_IMAGES, Update, keep_mask, validate_sampling
from .service import NOT_STARTED, OutOfMemory, Service

__all__ = ["MAX_IMAGES", "NOT_STARTED", "OutOfMemory", "RequestError", "Service", "Update", "keep_mask",
           "read_parameters", "save_png", "validate_sampling"]
