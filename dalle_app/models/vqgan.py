"""VQGAN from taming-transformers (VQModel and GumbelVQ) as plain PyTorch modules, without taming or Lightning.

Parameter names follow taming exactly, so a Lightning `.ckpt` `state_dict` (minus the `loss.*` training modules)
loads into `VQGanVAE.model` with strict=True, and the `vae.model.*` part of a DALLE-pytorch checkpoint loads when
the VAE sits in DALLE under `vae.`. Images go in and come out in [0, 1], as DALLE-pytorch's `VQGanVAE` expects.

Gumbel models: DALLE-pytorch encodes with `GumbelQuantize`, which adds Gumbel noise even in eval mode, so the same
image gives different tokens on each call. Here encoding takes the argmax of the logits (deterministic) unless
`gumbel_sampling=True`, which reproduces the reference's noisy hard sample (same RNG calls, same result for a seed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .vae import token_grid

# taming `model.target` -> is_gumbel. VQNoDiscModel only differs from VQModel in its training loss.
TAMING_TARGETS = {
    "taming.models.vqgan.VQModel": False,
    "taming.models.vqgan.VQNoDiscModel": False,
    "taming.models.vqgan.GumbelVQ": True,
}


@dataclass
class VQGanConfig:
    """Architecture of a taming VQGAN; the defaults are the ImageNet f16 / 1024-code model DALLE-pytorch downloads."""

    embed_dim: int = 256
    n_embed: int = 1024
    gumbel: bool = False
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 256
    double_z: bool = False
    resamp_with_conv: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.double_z:
            raise ValueError("ddconfig.double_z is true, which taming's VQModel cannot run; set double_z: false.")
        if self.gumbel and self.embed_dim != self.z_channels:
            raise ValueError("GumbelVQ needs embed_dim == ddconfig.z_channels (its proj conv reads quant_conv's "
                             "output); fix the config.")


def parse_taming_yaml(text: str) -> dict:
    """Parse a taming-transformers YAML config (e.g. `model.yaml` next to a `.ckpt`) into a plain dict with PyYAML."""
    import yaml  # optional dependency, only needed for taming YAML files

    cfg = yaml.safe_load(text)
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError("This YAML has no top-level `model:` section, so it is not a taming-transformers config.")
    return cfg


def config_from_dict(cfg: dict) -> VQGanConfig:
    """Build a VQGanConfig from taming YAML structure (`model.target` / `model.params`), its `model` or `params`
    section, or a flat dict as written by `VQGanVAE.to_config()`."""
    if "model" in cfg and isinstance(cfg["model"], dict):
        cfg = cfg["model"]
    gumbel = cfg.get("gumbel")
    if "target" in cfg:
        if cfg["target"] not in TAMING_TARGETS:
            raise ValueError(f"Unsupported taming model target {cfg['target']!r}; "
                             f"expected one of {sorted(TAMING_TARGETS)}.")
        gumbel = TAMING_TARGETS[cfg["target"]]
    params = cfg.get("params", cfg)
    if params.get("remap") is not None:
        raise ValueError("This config remaps codebook indices (`remap`), which is not supported; "
                         "use a config without it.")
    flat = {**params.get("ddconfig", {}), **{k: v for k, v in params.items() if k != "ddconfig"}}
    if gumbel is not None:
        flat["gumbel"] = bool(gumbel)
    missing = [k for k in ("embed_dim", "n_embed") if k not in flat]
    if missing:
        raise ValueError(f"VQGAN config lacks {missing}; give model.params.embed_dim and model.params.n_embed.")
    names = {f.name for f in fields(VQGanConfig)}
    return VQGanConfig(**{k: v for k, v in flat.items() if k in names})


def strip_loss_keys(state_dict: dict, prefix: str = "") -> dict:
    """Return `state_dict` without the taming training-loss tensors (`{prefix}loss.*`: LPIPS and discriminator).

    Use prefix "" for a Lightning `.ckpt` state_dict and "vae.model." for a DALLE-pytorch checkpoint.
    """
    drop = prefix + "loss."
    return {k: v for k, v in state_dict.items() if not k.startswith(drop)}


def infer_vqgan_config(state_dict: dict, prefix: str = "", resolution: int = 256) -> VQGanConfig:
    """Recover the architecture from the tensor shapes of a VQGAN state_dict (keys `{prefix}encoder.*` etc.).

    DALLE-pytorch checkpoints store VQGAN weights but not the YAML. Everything except the training resolution is
    visible in the shapes; `resolution` (256 for every published taming model) only places the attention blocks.
    """
    def shape(key):
        if prefix + key not in state_dict:
            raise ValueError(f"State dict has no {prefix + key!r}, so it does not hold a taming VQGAN "
                             f"under {prefix!r}.")
        return tuple(state_dict[prefix + key].shape)

    ch = shape("encoder.conv_in.weight")[0]
    levels = 1 + max(int(k[len(prefix):].split(".")[2]) for k in state_dict if k.startswith(prefix + "encoder.down."))
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
    num_res_blocks = 1 + max(int(k[len(prefix):].split(".")[4]) for k in state_dict
                             if k.startswith(prefix + "encoder.down.0.block."))
    attn_levels = [i for i in range(levels) if prefix + f"encoder.down.{i}.attn.0.q.weight" in state_dict]
    gumbel = prefix + "quantize.embed.weight" in state_dict
    n_embed, embed_dim = shape("quantize.embed.weight" if gumbel else "quantize.embedding.weight")
    return VQGanConfig(
        embed_dim=embed_dim, n_embed=n_embed, gumbel=gumbel, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(resolution // 2 ** i for i in attn_levels), resolution=resolution,
        in_channels=shape("encoder.conv_in.weight")[1], out_ch=shape("decoder.conv_out.weight")[0],
        z_channels=shape("decoder.conv_in.weight")[1],
        resamp_with_conv=prefix + "encoder.down.0.downsample.conv.weight" in state_dict or levels == 1,
    )


# ----------------------------------------------------------------------------------------------------------------
# building blocks (taming.modules.diffusionmodules.model)

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs for q, k, v and the output projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        q, k, v = (conv(x_norm).reshape(b, c, h * w).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (b, hw, c)
        out = F.scaled_dot_product_attention(q, k, v)  # scale c**-0.5, as taming
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Level(nn.Module):
    """One resolution level: `block.{j}` ResnetBlocks, optional `attn.{j}` after each, then a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VQGanConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + cfg.ch_mult
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * mult
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, cfg.dropout)
                      for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(block_out) for _ in blocks] if res in cfg.attn_resolutions else []
            level = Level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_out, cfg.resamp_with_conv)
                res //= 2
            self.down.append(level)
        width = cfg.ch * cfg.ch_mult[-1]
        self.mid = _mid(width, cfg.dropout)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGanConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg.dropout)
        levels = [None] * n
        for i in reversed(range(n)):  # built lowest resolution first, stored as up.{i} by level like taming
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, cfg.dropout)
                      for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(block_out) for _ in blocks] if res in cfg.attn_resolutions else []
            levels[i] = Level(blocks, attns)
            if i != 0:
                levels[i].upsample = Upsample(block_out, cfg.resamp_with_conv)
                res *= 2
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer (taming VectorQuantizer2); the codebook is `embedding.weight` (n, d)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(b, d, h, w) latents -> (b, h, w) indices of the closest codes (squared L2, computed in float32)."""
        b, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        e = self.embedding.weight.float()
        # same expansion as taming (|z|^2 + |e|^2 - 2 z.e) so near-ties break the same way
        dist = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        return dist.argmin(1).reshape(b, h, w)


class GumbelQuantize(nn.Module):
    """Gumbel-softmax quantizer (taming GumbelQuantize): `proj` gives logits over `embed.weight` (n, d)."""

    def __init__(self, num_hiddens: int, embed_dim: int, n_embed: int):
        super().__init__()
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def codebook(self) -> torch.Tensor:
        return self.embed.weight

    def indices(self, z: torch.Tensor, sample: bool = False, temperature: float = 1.0) -> torch.Tensor:
        """(b, d, h, w) latents -> (b, h, w) indices: argmax of the logits, or a hard Gumbel sample if `sample`."""
        logits = self.proj(z)
        if sample:  # exactly the reference's eval-mode call, so a seeded run gives its tokens
            return F.gumbel_softmax(logits, tau=temperature, dim=1, hard=True).argmax(dim=1)
        return logits.argmax(dim=1)


class VQModel(nn.Module):
    """The taming model's inference parts: encoder, quant_conv, quantize, post_quant_conv, decoder."""

    def __init__(self, cfg: VQGanConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.gumbel:
            self.quantize = GumbelQuantize(cfg.z_channels, cfg.embed_dim, cfg.n_embed)
        else:
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (b, c, H, W) -> latents (b, embed_dim, h, w) before quantization."""
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latents (b, embed_dim, h, w) -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(quant))


class VQGanVAE(nn.Module):
    """A taming VQGAN with the interface DALLE uses: `image_size`, `num_layers`, `num_tokens`, `channels`,
    `get_codebook_indices(images in [0, 1]) -> (b, h*w)` and `decode(ids) -> images in [0, 1]`.

    `image_size` defaults to the config's training resolution (DALLE-pytorch hard-coded 256); pass `image_size`
    to override it. `num_layers` is the number of 2x downsamplings, len(ch_mult) - 1.
    """

    def __init__(self, config: VQGanConfig | None = None, image_size: int | None = None, gumbel_sampling: bool = False):
        super().__init__()
        self.config = config or VQGanConfig()
        self.model = VQModel(self.config)
        self.channels = self.config.in_channels
        self.num_layers = len(self.config.ch_mult) - 1
        self.num_tokens = self.config.n_embed
        self.image_size = image_size or self.config.resolution
        self.is_gumbel = self.config.gumbel
        self.gumbel_sampling = gumbel_sampling
        if self.image_size % 2 ** self.num_layers:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the downsampling factor "
                             f"{2 ** self.num_layers}; pick a multiple of it.")

    @classmethod
    def from_config(cls, cfg: dict, **kwargs) -> "VQGanVAE":
        """Build from a taming YAML dict (see `parse_taming_yaml`) or a flat dict from `to_config()`."""
        if "image_size" in cfg and "image_size" not in kwargs:
            kwargs["image_size"] = int(cfg["image_size"])
        return cls(config_from_dict(cfg), **kwargs)

    def to_config(self) -> dict:
        """Flat JSON-serialisable config (for the project's config.json); `from_config` reads it back."""
        cfg = asdict(self.config)
        cfg["ch_mult"], cfg["attn_resolutions"] = list(cfg["ch_mult"]), list(cfg["attn_resolutions"])
        return {"vae_type": "vqgan", **cfg, "image_size": self.image_size}

    def load_taming_state_dict(self, state_dict: dict) -> None:
        """Load a taming Lightning `.ckpt` (the whole dict or its `state_dict`), dropping `loss.*`, strictly."""
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]
        self.model.load_state_dict(strip_loss_keys(state_dict), strict=True)

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """Images (b, c, H, W) in [0, 1] -> token ids (b, h*w), long. `sample` (Gumbel only) overrides
        `self.gumbel_sampling`: True draws the reference's noisy hard sample instead of the argmax."""
        param = self.model.quant_conv.weight
        x = (2 * images - 1).to(device=param.device, dtype=param.dtype)
        z = self.model.encode_to_prequant(x)
        if self.is_gumbel:
            ids = self.model.quantize.indices(z, sample=self.gumbel_sampling if sample is None else sample)
        else:
            ids = self.model.quantize.indices(z)
        return ids.flatten(1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (b, n) with n a square, or (b, h, w) -> images (b, c, H, W) in [0, 1]."""
        ids = token_grid(ids)
        codebook = self.model.quantize.codebook()
        z = F.embedding(ids.to(codebook.device), codebook).permute(0, 3, 1, 2)  # (b, embed_dim, h, w)
        images = self.model.decode(z)
        return (images.clamp(-1.0, 1.0) + 1) * 0.5
