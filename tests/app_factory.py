"""A tiny random model in the project format (yttm tokenizer trained on shapes-world captions) for app tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from dalle_app.manager import save_pretrained
from dalle_app.models import CLIP, DALLE, DiscreteVAE

VAE_PARAMS = dict(image_size=32, num_layers=2, num_tokens=64, codebook_dim=16, hidden_dim=8,
                  num_resnet_blocks=0, channels=3)
TEXT_SEQ_LEN = 16


def make_tiny_model(folder: str | Path, seed: int = 0, with_clip: bool = True, vae=None) -> Path:
    """Write a random (untrained) model with an 8x8 token grid of 32 px images to `folder`; return the folder.

    vae: (kind, params, module) to use another VAE (e.g. a VQGanVAE with fixture weights) instead of the random
    DiscreteVAE; the image size and token grid are then the VAE's."""
    from dalle_app.tokenizers import train_yttm
    from dalle_app.world import caption, sample_scene

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    texts = [caption(sample_scene(rng), rng) for _ in range(300)]
    tokenizer_file = folder.parent / f"{folder.name}_tokenizer.bpe"
    tokenizer = train_yttm(texts, 120, tokenizer_file)
    vocab = tokenizer.vocab_size
    torch.manual_seed(seed)
    vae_kind, vae_params, vae = vae or ("DiscreteVAE", VAE_PARAMS, DiscreteVAE(**VAE_PARAMS))
    hparams = dict(dim=32, num_text_tokens=vocab, text_seq_len=TEXT_SEQ_LEN, depth=2, heads=2, dim_head=16,
                   attn_types=("full",), shift_tokens=True, rotary_emb=True)
    dalle = DALLE(vae=vae, **hparams)
    clip_params = dict(dim_text=16, dim_image=16, dim_latent=16, num_text_tokens=vocab, text_enc_depth=1,
                       text_seq_len=TEXT_SEQ_LEN, text_heads=2, visual_enc_depth=1, visual_heads=2,
                       visual_image_size=vae.image_size, visual_patch_size=8)
    clip = CLIP(**clip_params) if with_clip else None
    config = {"dalle": hparams, "vae": {"kind": vae_kind, "params": vae_params},
              "clip": {"params": clip_params} if with_clip else None, "tokenizer": {"kind": "yttm"}}
    save_pretrained(folder, dalle=dalle, clip=clip, tokenizer_file=tokenizer_file, config=config)
    return folder
