"""Build small DALLE-pytorch checkpoints of every format for the model-manager tests.

`dalle_state_dict` writes the DALLE-pytorch 1.6.6 key layout (shared/reference/dalle_state_dict_keys.txt
sections 1-4); `to_old_layout` turns it into the layouts of older releases (section 11 rules).
Tensors are random but deterministic (seeded), so remapped weights can be compared exactly.
"""

from __future__ import annotations

import torch

from dalle_app.manager.remap import rotary_table

VAE_PARAMS = dict(image_size=32, num_layers=2, num_tokens=64, codebook_dim=16, hidden_dim=8,
                  num_resnet_blocks=1, channels=3)
HPARAMS = dict(dim=32, num_text_tokens=50, text_seq_len=8, depth=2, heads=2, dim_head=64,
               reversible=False, attn_types=("full", "axial_row"), loss_img_weight=7, stable=False,
               shift_tokens=True, rotary_emb=True, shared_attn_ids=None, shared_ff_ids=None,
               share_input_output_emb=False, ff_dropout=0.0, attn_dropout=0.0)


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def discrete_vae_state_dict(p: dict = VAE_PARAMS, seed: int = 0) -> dict:
    """DiscreteVAE keys (section 1) for the given params."""
    g = torch.Generator().manual_seed(seed)
    h, c, n, layers, res = p["hidden_dim"], p.get("channels", 3), p["num_tokens"], p["num_layers"], p["num_resnet_blocks"]
    sd = {"codebook.weight": _rand(g, n, p["codebook_dim"])}
    for j in range(layers):
        sd[f"encoder.{j}.0.weight"] = _rand(g, h, c if j == 0 else h, 4, 4)
        sd[f"encoder.{j}.0.bias"] = _rand(g, h)
    for r in range(res):
        j = layers + r
        for idx, k in ((0, 3), (2, 3), (4, 1)):
            sd[f"encoder.{j}.net.{idx}.weight"] = _rand(g, h, h, k, k)
            sd[f"encoder.{j}.net.{idx}.bias"] = _rand(g, h)
    sd[f"encoder.{layers + res}.weight"] = _rand(g, n, h, 1, 1)
    sd[f"encoder.{layers + res}.bias"] = _rand(g, n)
    j = 0
    if res:
        sd["decoder.0.weight"] = _rand(g, h, p["codebook_dim"], 1, 1)
        sd["decoder.0.bias"] = _rand(g, h)
        j = 1
        for _ in range(res):
            for idx, k in ((0, 3), (2, 3), (4, 1)):
                sd[f"decoder.{j}.net.{idx}.weight"] = _rand(g, h, h, k, k)
                sd[f"decoder.{j}.net.{idx}.bias"] = _rand(g, h)
            j += 1
    for layer in range(layers):
        sd[f"decoder.{j}.0.weight"] = _rand(g, p["codebook_dim"] if (layer == 0 and not res) else h, h, 4, 4)
        sd[f"decoder.{j}.0.bias"] = _rand(g, h)
        j += 1
    sd[f"decoder.{j}.weight"] = _rand(g, c, h, 1, 1)
    sd[f"decoder.{j}.bias"] = _rand(g, c)
    return sd


def dalle_state_dict(h: dict = HPARAMS, vae: dict | None = VAE_PARAMS, seed: int = 1, vae_sd: dict | None = None,
                     sandwich_norm: bool = False) -> dict:
    """A DALLE state_dict in the 1.6.6 layout; `vae_sd` (already without prefix) replaces the DiscreteVAE one."""
    g = torch.Generator().manual_seed(seed)
    dim, T, V = h["dim"], h["text_seq_len"], h["num_text_tokens"]
    vae_tokens = vae["num_tokens"] if vae else 64
    fmap = vae["image_size"] // 2 ** vae["num_layers"] if vae else 8
    inner = h["heads"] * h["dim_head"]
    sd = {}
    if h["rotary_emb"]:
        sd["transformer.pos_emb"] = rotary_table(T, fmap, h["dim_head"])
    else:
        sd["text_pos_emb.weight"] = _rand(g, T + 1, dim)
        sd["image_pos_emb.weights.0"] = _rand(g, 1, fmap, 1, dim)
        sd["image_pos_emb.weights.1"] = _rand(g, 1, 1, fmap, dim)
    shift = 2 if h["shift_tokens"] else 0
    for i in range(h["depth"]):
        for sub in (0, 1):
            prefix = (f"transformer.layers.blocks.{i}.{'fg'[sub]}.net." if h["reversible"]
                      else f"transformer.layers.layers.{i}.{sub}.")
            sd[prefix + "scale"] = _rand(g, 1, 1, dim)
            sd[prefix + "fn.norm.weight"] = _rand(g, dim)
            sd[prefix + "fn.norm.bias"] = _rand(g, dim)
            if sandwich_norm:
                sd[prefix + "fn.norm_out.weight"] = _rand(g, dim)
                sd[prefix + "fn.norm_out.bias"] = _rand(g, dim)
            if sub == 0:
                leaf = prefix + "fn." + "fn." * (2 + shift)
                sd[leaf + "to_qkv.weight"] = _rand(g, 3 * inner, dim)
                sd[leaf + "to_out.0.weight"] = _rand(g, dim, inner)
                sd[leaf + "to_out.0.bias"] = _rand(g, dim)
            else:
                leaf = prefix + "fn." + "fn." * (1 + shift)
                sd[leaf + "net.0.weight"] = _rand(g, dim * 8, dim)
                sd[leaf + "net.0.bias"] = _rand(g, dim * 8)
                sd[leaf + "net.3.weight"] = _rand(g, dim, dim * 4)
                sd[leaf + "net.3.bias"] = _rand(g, dim)
    total = V + T + vae_tokens
    sd["to_logits.0.weight"] = _rand(g, dim)
    sd["to_logits.0.bias"] = _rand(g, dim)
    sd["to_logits.1.weight"] = _rand(g, total, dim)
    sd["to_logits.1.bias"] = _rand(g, total)
    sd["text_emb.weight"] = _rand(g, V + T, dim)
    sd["image_emb.weight"] = _rand(g, vae_tokens, dim)
    if vae_sd is None and vae is not None:
        vae_sd = discrete_vae_state_dict(vae)
    for key, value in (vae_sd or {}).items():
        sd["vae." + key] = value
    return sd


def to_old_layout(sd: dict, shift_tokens: bool, axial_underscore: bool = True, old_wrappers: bool = True,
                  short_pos_emb: bool = False) -> dict:
    """Rewrite a 1.6.6 state_dict to an older release's layout (keys file section 11)."""
    out = {}
    for key, value in sd.items():
        new = key
        if axial_underscore:
            new = new.replace("image_pos_emb.weights.0", "image_pos_emb.weights_0")
            new = new.replace("image_pos_emb.weights.1", "image_pos_emb.weights_1")
        if old_wrappers and shift_tokens:
            # 1.4.0+: attention fn.fn.fn.fn.fn.X, FF fn.fn.fn.fn.net ; <=1.2.2: fn.fn.fn.X, fn.fn.fn.net
            new = new.replace(".fn.fn.fn.fn.fn.", ".fn.fn.fn.").replace(".fn.fn.fn.fn.net.", ".fn.fn.fn.net.")
        elif old_wrappers:
            new = new.replace(".fn.fn.fn.to_", ".fn.fn.to_").replace(".fn.fn.fn.attn_fn.", ".fn.fn.attn_fn.")
        if short_pos_emb and key == "transformer.pos_emb":
            value = value[:, :-1][None]
        out[new] = value
    return out


def train_dalle_dict(sd: dict, hparams: dict | None = HPARAMS, vae_params: dict | None = VAE_PARAMS,
                     version: str | None = "1.6.6", vae_class_name: str | None = "DiscreteVAE", **extra) -> dict:
    """The dict `train_dalle.py` saves; None values leave the key out (older releases)."""
    obj = {"weights": sd, "epoch": 3, "opt_state": None, "scheduler_state": None}
    for key, value in (("hparams", hparams), ("version", version), ("vae_class_name", vae_class_name)):
        if value is not None:
            obj[key] = dict(value) if isinstance(value, dict) else value
    obj["vae_params"] = dict(vae_params) if vae_params is not None else None
    obj.update(extra)
    return obj
