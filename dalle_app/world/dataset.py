"""Endless training data and a held-out caption set, both generated on the fly from seeded random streams.

Every stream is a ``random.Random`` seeded with a string, so streams are reproducible across runs and machines
(Python hashes string seeds with SHA-512) and streams with different names are independent:

* training: ``"train/{seed}/rank{rank}/worker{worker}of{num_workers}"``, one stream per DataLoader worker (and
  per distributed rank), so workers never yield the same samples;
* held-out: ``"heldout/{seed}"``. A held-out caption is therefore one drawn from a different random stream than
  any training sample. The world is small enough that short captions ("a red star") are also common in
  training; ``heldout_captions(..., exclude_training_sample=N)`` additionally drops every caption string that
  appears among N captions of the training stream of seed 0 (a check on a sample, not a guarantee for all seeds).

Public API::

    ShapesDataset(seed=0, image_size=128, rank=0)   # IterableDataset of (float tensor (3,S,S) in [0,1], caption)
    ShapesBatches(batch_size, seed=0, image_size=128, rank=0)  # whole batches: (uint8 (B,S,S,3), [captions])
    sample_pair(rng) -> (PIL.Image, caption, Scene)
    heldout_captions(n, seed=0, exclude_training_sample=0) -> list[str]
    heldout_scenes(n, seed=0) -> list[(Scene, caption)]
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .captions import caption
from .render import render
from .scene import IMAGE_SIZE, Scene, sample_scene


def sample_pair(rng: random.Random) -> tuple[Image.Image, str, Scene]:
    """One random scene, its rendered image (jittered) and one of its captions, all drawn from ``rng``."""
    scene = sample_scene(rng)
    return render(scene, rng), caption(scene, rng), scene


def training_stream(seed: int = 0, rank: int = 0, worker: int = 0, num_workers: int = 1) -> random.Random:
    """The random stream that training worker ``worker`` of ``num_workers`` on ``rank`` draws samples from."""
    return random.Random(f"train/{seed}/rank{rank}/worker{worker}of{num_workers}")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ShapesDataset(IterableDataset):
    """Endless stream of ``(image, caption)``: image a float tensor (3, image_size, image_size) in [0, 1].

    Args:
        seed (`int`, *optional*, defaults to 0): names the training stream; change it for a different stream.
        image_size (`int`, *optional*, defaults to 128): scenes are rendered at 128 px and resized (Lanczos) when
            another size is asked for.
        rank (`int`, *optional*, defaults to 0): distributed rank, so that each process gets its own stream.

    Each DataLoader worker draws from its own stream (see ``training_stream``); iterating again restarts it.
    """

    def __init__(self, seed: int = 0, image_size: int = IMAGE_SIZE, rank: int = 0):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
        self.seed, self.image_size, self.rank = seed, image_size, rank

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = training_stream(self.seed, self.rank, worker, num_workers)
        while True:
            image, text, _ = sample_pair(rng)
            if self.image_size != IMAGE_SIZE:
                image = image.resize((self.image_size, self.image_size), Image.LANCZOS)
            yield image_to_tensor(image), text


class ShapesBatches(IterableDataset):
    """Endless stream of whole training batches ``(images, captions)``, for ``DataLoader(..., batch_size=None)``.

    ``images`` is a uint8 tensor (batch_size, image_size, image_size, 3), channels last, as rendered: a quarter of
    the bytes of float images and no per-sample conversion, so a few workers keep a GPU fed; convert it on the
    device with ``images.permute(0, 3, 1, 2).float() / 255``. ``captions`` is a list of strings. The samples of a
    worker are those ``ShapesDataset`` with the same arguments yields in that worker, batched in order.
    """

    def __init__(self, batch_size: int, seed: int = 0, image_size: int = IMAGE_SIZE, rank: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
        self.batch_size, self.seed, self.image_size, self.rank = batch_size, seed, image_size, rank

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = training_stream(self.seed, self.rank, worker, num_workers)
        size = self.image_size
        while True:
            images = np.empty((self.batch_size, size, size, 3), dtype=np.uint8)
            captions = []
            for i in range(self.batch_size):
                image, text, _ = sample_pair(rng)
                if size != IMAGE_SIZE:
                    image = image.resize((size, size), Image.LANCZOS)
                images[i] = np.asarray(image)
                captions.append(text)
            yield torch.from_numpy(images), captions


def heldout_scenes(n: int, seed: int = 0) -> list[tuple[Scene, str]]:
    """``n`` held-out scenes with one caption each, from the held-out stream ``seed`` (deterministic)."""
    rng = random.Random(f"heldout/{seed}")
    pairs = []
    for _ in range(n):
        scene = sample_scene(rng)
        pairs.append((scene, caption(scene, rng)))
    return pairs


def heldout_captions(n: int, seed: int = 0, exclude_training_sample: int = 0) -> list[str]:
    """``n`` held-out captions (deterministic for a seed), optionally none of which occurs in a training sample.

    Args:
        n (`int`): how many captions.
        seed (`int`, *optional*, defaults to 0): names the held-out stream.
        exclude_training_sample (`int`, *optional*, defaults to 0): when > 0, draw that many captions from the
            training stream of seed 0 (single worker) and skip held-out captions equal to one of them. This
            favours long captions, since short ones are almost all seen in training.
    """
    seen: set[str] = set()
    if exclude_training_sample > 0:
        rng = training_stream(0)
        for _ in range(exclude_training_sample):
            seen.add(sample_pair(rng)[1])  # rendering draws jitter from the stream too, so render as training does
    captions: list[str] = []
    rng = random.Random(f"heldout/{seed}")
    for _ in range(100 * n + 1000):
        if len(captions) == n:
            break
        text = caption(sample_scene(rng), rng)
        if text not in seen:
            captions.append(text)
    if len(captions) < n:
        raise ValueError(f"Could only find {len(captions)} held-out captions not seen in training; lower n or "
                         f"exclude_training_sample.")
    return captions
