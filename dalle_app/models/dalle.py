"""DALLE: an autoregressive transformer over [bos, text tokens, image tokens], with DALLE-pytorch 1.6.6's arguments.

Token layout (T = text_seq_len, I = image_seq_len = fmap_size**2):
    position 0          bos (id 0)
    positions 1..T      text ids; id 0 is padding and becomes the per-position pad id num_text_tokens + p
    positions T+1..     image ids (looked up in a separate embedding)
Logits at position p predict token p+1; text positions may only predict text ids and image positions image ids
(the logits mask). Image id k has logit index `num_text_tokens + k`.

Sampling lives in `dalle_app.engine`; `generate_images` / `generate_texts` here keep DALLE-pytorch's signatures
and call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed_linear import Linear, packed_linear
from .transformer import InferenceCache, Transformer


class DivideMax(nn.Module):
    """x / max(x) along `dim` (max detached), DALLE-pytorch's output stabiliser when `stable=True`."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x / x.amax(dim=self.dim, keepdim=True).detach()


class AxialPositionalEmbedding(nn.Module):
    """Sum of a row table (1, F, 1, dim) and a column table (1, 1, F, dim), flattened in raster order."""

    def __init__(self, dim: int, fmap_size: int):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(1, fmap_size, 1, dim)),
                                         nn.Parameter(torch.randn(1, 1, fmap_size, dim))])

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings (n, dim) for image positions 0..I-1."""
        table = (self.weights[0] + self.weights[1]).flatten(1, 2)[0]
        return table[positions]


class DALLE(nn.Module):
    """The DALL-E transformer; `vae` is any VAE with image_size, num_layers, num_tokens, channels,
    get_codebook_indices and decode (DiscreteVAE, VQGanVAE, OpenAIDiscreteVAE)."""

    def __init__(self, *, dim, vae, num_text_tokens=10000, text_seq_len=256, depth, heads=8, dim_head=64,
                 reversible=False, attn_dropout=0.0, ff_dropout=0, sparse_attn=False, attn_types=None,
                 loss_img_weight=7, stable=False, sandwich_norm=False, shift_tokens=True, rotary_emb=True,
                 shared_attn_ids=None, shared_ff_ids=None, share_input_output_emb=False,
                 optimize_for_inference=False, conv_like_window="above_left"):
        super().__init__()
        self.fmap_size = vae.image_size // (2 ** vae.num_layers)
        self.vocab_text = num_text_tokens  # the tokenizer's vocabulary
        self.num_text_tokens = num_text_tokens + text_seq_len  # plus one pad id per text position
        self.num_image_tokens = vae.num_tokens
        self.total_tokens = self.num_text_tokens + self.num_image_tokens
        self.text_seq_len = text_seq_len
        self.image_seq_len = self.fmap_size ** 2
        self.total_seq_len = text_seq_len + self.image_seq_len
        self.loss_img_weight, self.stable = loss_img_weight, stable
        self.rotary_emb, self.share_input_output_emb = rotary_emb, share_input_output_emb
        self.hparams = dict(num_text_tokens=num_text_tokens, text_seq_len=text_seq_len, dim=dim, depth=depth,
                            heads=heads, dim_head=dim_head, reversible=reversible, attn_dropout=attn_dropout,
                            ff_dropout=ff_dropout, attn_types=tuple(attn_types or ("full",)),
                            loss_img_weight=loss_img_weight, stable=stable, sandwich_norm=sandwich_norm,
                            shift_tokens=shift_tokens, rotary_emb=rotary_emb,
                            shared_attn_ids=tuple(shared_attn_ids) if shared_attn_ids else None,
                            shared_ff_ids=tuple(shared_ff_ids) if shared_ff_ids else None,
                            share_input_output_emb=share_input_output_emb, conv_like_window=conv_like_window)

        self.vae = vae
        for p in self.vae.parameters():
            p.requires_grad = False

        self.transformer = Transformer(
            dim=dim, causal=True, seq_len=self.total_seq_len, depth=depth, heads=heads, dim_head=dim_head,
            reversible=reversible, attn_dropout=attn_dropout, ff_dropout=ff_dropout, attn_types=attn_types,
            image_fmap_size=self.fmap_size, sparse_attn=sparse_attn, stable=stable, sandwich_norm=sandwich_norm,
            shift_tokens=shift_tokens, rotary_emb=rotary_emb, shared_attn_ids=shared_attn_ids,
            shared_ff_ids=shared_ff_ids, optimize_for_inference=optimize_for_inference,
            conv_like_window=conv_like_window)
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), Linear(dim, self.total_tokens))
        if not share_input_output_emb:
            self.text_emb = nn.Embedding(self.num_text_tokens, dim)
            self.image_emb = nn.Embedding(self.num_image_tokens, dim)
        if not rotary_emb:
            self.text_pos_emb = nn.Embedding(text_seq_len + 1, dim)
            self.image_pos_emb = AxialPositionalEmbedding(dim, self.fmap_size)
        self.norm_by_max = DivideMax(dim=-1) if stable else nn.Identity()

        pos = torch.arange(self.total_seq_len)[:, None]
        tok = torch.arange(self.total_tokens)[None, :]
        allowed = (pos < text_seq_len) == (tok < self.num_text_tokens)
        self.register_buffer("logits_mask", ~allowed[None], persistent=False)  # True = forbidden

        self.register_load_state_dict_pre_hook(_load_reference_aliases)
        self.register_state_dict_post_hook(_emit_reference_aliases)

    # -- embeddings ------------------------------------------------------------------------------------------------
    def _text_table(self):
        return self.to_logits[1].weight[:self.num_text_tokens] if self.share_input_output_emb else self.text_emb.weight

    def _image_table(self):
        return self.to_logits[1].weight[self.num_text_tokens:] if self.share_input_output_emb else self.image_emb.weight

    def prepare_text(self, text: torch.Tensor) -> torch.Tensor:
        """Replace padding (id 0) by per-position pad ids and prepend bos: (b, T) -> (b, T+1). Never in place."""
        pad_ids = torch.arange(self.text_seq_len, device=text.device) + self.vocab_text
        text = torch.where(text == 0, pad_ids, text)
        return F.pad(text, (1, 0), value=0)

    def embed_text(self, text_with_bos: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embeddings (b, n, dim) of prepared text ids at positions start.. (bos at 0)."""
        tokens = F.embedding(text_with_bos, self._text_table())
        if not self.rotary_emb:
            positions = torch.arange(start, start + text_with_bos.shape[1], device=tokens.device)
            tokens = tokens + self.text_pos_emb(positions)
        return tokens

    def embed_image(self, image_ids: torch.Tensor, start=0) -> torch.Tensor:
        """Embeddings (b, n, dim) of image ids at image positions start.. (an int, or a tensor of positions)."""
        tokens = F.embedding(image_ids, self._image_table())
        if not self.rotary_emb:
            positions = start if torch.is_tensor(start) else torch.arange(
                start, start + image_ids.shape[1], device=tokens.device)
            tokens = tokens + self.image_pos_emb(positions)
        return tokens

    def embed(self, text: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of [bos, text, image ids] (b, T+1+m, dim); `text` is raw (b, T) with 0 as padding."""
        tokens = self.embed_text(self.prepare_text(text))
        if image_ids is not None and image_ids.shape[1] > 0:
            tokens = torch.cat((tokens, self.embed_image(image_ids)), dim=1)
        return tokens

    def to_image_ids(self, image: torch.Tensor) -> torch.Tensor:
        """Image ids (b, m) from ids or from raw images (b, c, s, s) in [0, 1]."""
        if image.dim() == 4:
            return self.vae.get_codebook_indices(image)
        return image.long()

    # -- heads -----------------------------------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Full-vocabulary logits (b, n, total_tokens) for hidden states at positions start.., masked by type."""
        logits = self.to_logits(self.norm_by_max(hidden))
        mask = self.logits_mask[:, start:start + hidden.shape[1]]
        return logits.masked_fill(mask, -torch.finfo(logits.dtype).max)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the image codebook only (b, n, num_image_tokens): the head used while sampling images."""
        norm, proj = self.to_logits
        h = norm(self.norm_by_max(hidden))
        return packed_linear(h, proj.weight[self.num_text_tokens:], proj.bias[self.num_text_tokens:], proj,
                             "_packed_image_head")

    def new_cache(self, batch_size: int, device=None, dtype=None) -> InferenceCache:
        """A static decoding cache for `batch_size` rows covering the whole sequence."""
        return self.transformer.new_cache(batch_size, self.total_seq_len, device, dtype)

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, text, image=None, return_loss=False, null_cond_prob=0.0, cache=None):
        """Logits (b, n, total_tokens) for [bos, text, image], or the training loss with `return_loss=True`.

        text: (b, T) ids, 0 = padding. image: ids (b, m) or raw images in [0, 1]. null_cond_prob: probability per row
        of replacing the text by padding (classifier-free guidance training). cache: a dict, empty on the first call;
        later calls with longer inputs only run the new tokens (KV cache).
        """
        if text.dim() != 2 or text.shape[1] != self.text_seq_len:
            raise ValueError(f"text must have shape (batch, {self.text_seq_len}); got {tuple(text.shape)}. "
                             "Pad with zeros or truncate to text_seq_len.")
        if null_cond_prob > 0:
            keep = torch.rand(text.shape[0], device=text.device) >= null_cond_prob
            text = text * keep[:, None]  # a new tensor: the caller's text is left alone
        image_ids = self.to_image_ids(image) if image is not None else None
        tokens = self.embed(text, image_ids)
        if tokens.shape[1] > self.total_seq_len:
            tokens = tokens[:, :-1]
        if self.stable and self.training:
            tokens = tokens * 0.1 + tokens.detach() * 0.9

        start = 0
        if cache is not None:
            if "state" not in cache:
                cache["state"] = self.new_cache(tokens.shape[0], tokens.device, tokens.dtype)
                cache["offset"] = 0
            start = cache["offset"]
            tokens = tokens[:, start:]
        hidden = self.transformer(tokens, cache=cache["state"] if cache is not None else None, start=start)
        logits = self.logits(hidden, start)
        if cache is not None:
            cache["offset"] = start + tokens.shape[1]
        if not return_loss:
            return logits

        if image_ids is None:
            raise ValueError("return_loss=True needs the image (ids or pixels).")
        text_targets = self.prepare_text(text)[:, 1:]
        logits = logits.float()
        loss_text = F.cross_entropy(logits[:, :self.text_seq_len].transpose(1, 2), text_targets)
        loss_img = F.cross_entropy(logits[:, self.text_seq_len:].transpose(1, 2), image_ids + self.num_text_tokens)
        return (loss_text + self.loss_img_weight * loss_img) / (self.loss_img_weight + 1)

    # -- DALLE-pytorch's generation API, served by the engine --------------------------------------------------------
    @torch.no_grad()
    def generate_images(self, text, *, clip=None, filter_thres=0.5, temperature=1.0, img=None,
                        num_init_img_tokens=None, cond_scale=1.0, use_cache=False):
        """DALLE-pytorch's `generate_images`, correct: images (b, c, s, s) from the VAE decoder, plus CLIP scores
        when `clip` is given. Uses the KV cache always (use_cache is accepted for compatibility)."""
        from ..engine import SamplingOptions, generate_image_tokens

        options = SamplingOptions(temperature=temperature, filter_thres=filter_thres, cond_scale=cond_scale)
        prime_ids = None
        if img is not None:
            prime_ids = self.vae.get_codebook_indices(img)
            keep = num_init_img_tokens if num_init_img_tokens is not None else int(0.4375 * self.image_seq_len)
            if not 0 <= keep < self.image_seq_len:
                raise ValueError(f"num_init_img_tokens must be in [0, {self.image_seq_len}); got {keep}.")
            prime_ids = prime_ids[:, :keep]
        result = generate_image_tokens(self, text[:, :self.text_seq_len], options, prime_ids=prime_ids)
        images = self.vae.decode(result.image_ids)
        if clip is not None:
            scores = clip(text[:, :self.text_seq_len], images, return_loss=False)
            return images, scores
        return images

    @torch.no_grad()
    def generate_texts(self, tokenizer, text=None, *, filter_thres=0.5, temperature=1.0):
        """DALLE-pytorch's `generate_texts`: complete `text` (a string) up to text_seq_len tokens on any device.
        Returns (token ids (1, T), [decoded string])."""
        from ..engine import SamplingOptions, complete_text

        options = SamplingOptions(temperature=temperature, filter_thres=filter_thres)
        prefix = tokenizer.encode(text) if text else []
        ids = complete_text(self, [prefix], options).token_ids
        pad = set(range(self.vocab_text, self.num_text_tokens))
        return ids, [tokenizer.decode(ids[0].tolist(), pad_tokens=pad)]


# share_input_output_emb: DALLE-pytorch saves text_emb.linear.* and image_emb.linear.* as aliases of to_logits.1.*
def _emit_reference_aliases(module, state_dict, prefix, local_metadata):
    if module.share_input_output_emb:
        for name in ("text_emb", "image_emb"):
            for p in ("weight", "bias"):
                state_dict[f"{prefix}{name}.linear.{p}"] = state_dict[f"{prefix}to_logits.1.{p}"]


def _load_reference_aliases(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for name in ("text_emb", "image_emb"):
        if module.share_input_output_emb:
            for p in ("weight", "bias"):
                state_dict.pop(f"{prefix}{name}.linear.{p}", None)
    for i in (0, 1):  # axial_positional_embedding <= 0.2.1 named these weights_0 / weights_1
        old = f"{prefix}image_pos_emb.weights_{i}"
        if old in state_dict:
            state_dict[f"{prefix}image_pos_emb.weights.{i}"] = state_dict.pop(old)
