"""VQGanVAE (plain and Gumbel) and OpenAIDiscreteVAE inside DALLE: training loss, engine generation, priming."""

import pytest
import torch

from dalle_app.engine import SamplingOptions, generate_image_tokens
from dalle_app.models import DALLE, OpenAIDiscreteVAE, VQGanConfig, VQGanVAE

VAES = {
    "vqgan": lambda: VQGanVAE(VQGanConfig(embed_dim=16, n_embed=64, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                          attn_resolutions=(8,), resolution=32, z_channels=16)),
    "gumbel": lambda: VQGanVAE(VQGanConfig(embed_dim=16, n_embed=64, gumbel=True, ch=32, ch_mult=(1, 2),
                                           num_res_blocks=1, attn_resolutions=(8,), resolution=32, z_channels=16)),
    "openai": lambda: OpenAIDiscreteVAE(n_hid=8, n_blk_per_group=1, vocab_size=64, n_init=8, image_size=32),
}


@pytest.mark.parametrize("kind", VAES)
def test_dalle_with_vae_kind_generates_and_primes(kind):
    torch.manual_seed(0)
    vae = VAES[kind]().eval()
    dalle = DALLE(dim=32, vae=vae, num_text_tokens=50, text_seq_len=6, depth=2, heads=2, dim_head=16).eval()
    images = torch.rand(2, 3, 32, 32)
    ids = vae.get_codebook_indices(images)
    assert ids.shape == (2, dalle.image_seq_len) and int(ids.max()) < vae.num_tokens
    text = torch.randint(1, 50, (2, 6))
    loss = dalle(text, images, return_loss=True)
    assert torch.isfinite(loss)
    keep = dalle.image_seq_len // 4
    out = generate_image_tokens(dalle, text, SamplingOptions(top_k=8, cond_scale=2.0), seeds=[0, 1],
                                prime_ids=ids[:, :keep])
    assert torch.equal(out.image_ids[:, :keep], ids[:, :keep])
    decoded = vae.decode(out.image_ids)
    assert decoded.shape == (2, 3, 32, 32) and 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    primed = dalle.generate_images(text, img=images, num_init_img_tokens=keep, filter_thres=0.9)
    assert primed.shape == (2, 3, 32, 32)
