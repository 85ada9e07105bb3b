"""OpenAI's DALL-E discrete VAE (the `dall_e` package) as plain PyTorch modules, without unpickling anything.

Parameter names follow `dall_e` (`enc.blocks.*` / `dec.blocks.*`, convolution params `w` / `b`), so the
`vae.enc.*` / `vae.dec.*` part of a DALLE-pytorch checkpoint loads strictly when this VAE sits in DALLE under `vae.`.

OpenAI published the weights only as pickled modules (`encoder.pkl`, `decoder.pkl`). Turning them into
safetensors is a trusted one-time step that needs the `dall_e` package and unpickles code:

    python -m dalle_app.models.openai_dvae convert encoder.pkl decoder.pkl openai_dvae.safetensors

The app itself only ever reads the resulting safetensors file.

Difference from the reference on CUDA: `dall_e` runs most convolutions in float16 there; this module runs in
whatever dtype it is cast to (float32 unless you call `.half()`), so its CUDA outputs are slightly more precise.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .vae import token_grid

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Squeeze [0, 1] pixels into [eps, 1 - eps], the range the dVAE encoder was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv2d(nn.Module):
    """Same-padded convolution whose parameters are named `w` and `b`, as in `dall_e.utils.Conv2d`."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kernel_size, kernel_size) / math.sqrt(n_in * kernel_size ** 2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class ResPath(nn.Module):
    """ReLU before each of `conv_1` .. `conv_4`."""

    def __init__(self, convs: list[Conv2d]):
        super().__init__()
        for i, conv in enumerate(convs):
            self.add_module(f"conv_{i + 1}", conv)

    def forward(self, x):
        for conv in self.children():
            x = conv(F.relu(x))
        return x


class ResBlock(nn.Module):
    """x -> id_path(x) + post_gain * res_path(x); `id_path` is a 1x1 conv only where the width changes."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernel_sizes: tuple[int, int, int, int]):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"dVAE block width {n_out} must be a multiple of 4; use an n_hid divisible by 4.")
        n_hid = n_out // 4
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        self.res_path = ResPath([Conv2d(widths[i], widths[i + 1], k) for i, k in enumerate(kernel_sizes)])
        self.post_gain = 1 / n_layers ** 2

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class OutputConv(nn.Module):
    """ReLU then a 1x1 `conv` (the `output` stage of both networks)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = Conv2d(n_in, n_out, 1)

    def forward(self, x):
        return self.conv(F.relu(x))


class Group(nn.Module):
    """`block_1` .. `block_k`, then an optional resampling (max-pool 2 in the encoder, nearest x2 in the decoder)."""

    def __init__(self, blocks: list[ResBlock], resample: str | None):
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(f"block_{i + 1}", block)
        self.resample = resample

    def forward(self, x):
        for block in self.children():
            x = block(x)
        if self.resample == "pool":
            x = F.max_pool2d(x, kernel_size=2)
        elif self.resample == "upsample":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x


class Encoder(nn.Module):
    """dall_e Encoder: 7x7 input conv, `group_count` groups of width n_hid * 2**g with max-pool between,
    ReLU + 1x1 conv to `vocab_size` logits. dall_e hard-codes 4 groups; other counts are for small tests."""

    def __init__(self, n_hid=256, n_blk_per_group=2, group_count=4, input_channels=3, vocab_size=8192):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        kernels = (3, 3, 3, 1)
        layers = [("input", Conv2d(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(group_count):
            out = n_hid * 2 ** g
            blocks = [ResBlock(width if i == 0 else out, out, n_layers, kernels) for i in range(n_blk_per_group)]
            layers.append((f"group_{g + 1}", Group(blocks, "pool" if g < group_count - 1 else None)))
            width = out
        layers.append(("output", OutputConv(width, vocab_size)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    """dall_e Decoder: 1x1 conv from one-hot codes to `n_init`, groups of width n_hid * 2**(G-1-g) with nearest x2
    upsampling between, ReLU + 1x1 conv to 2 * output_channels (only the first half is used as pixel logits)."""

    def __init__(self, n_init=128, n_hid=256, n_blk_per_group=2, group_count=4, output_channels=3, vocab_size=8192):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        kernels = (1, 3, 3, 3)
        layers = [("input", Conv2d(vocab_size, n_init, 1))]
        width = n_init
        for g in range(group_count):
            out = n_hid * 2 ** (group_count - 1 - g)
            blocks = [ResBlock(width if i == 0 else out, out, n_layers, kernels) for i in range(n_blk_per_group)]
            layers.append((f"group_{g + 1}", Group(blocks, "upsample" if g < group_count - 1 else None)))
            width = out
        layers.append(("output", OutputConv(width, 2 * output_channels)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.blocks(x)


class OpenAIDiscreteVAE(nn.Module):
    """OpenAI's dVAE with the interface DALLE uses. Defaults are the published model: 256 px, 8192 codes, 32x32
    tokens (`num_layers` 3). Smaller widths are for tests; `enc` / `dec` hold the dall_e parameter trees."""

    def __init__(self, n_hid=256, n_blk_per_group=2, group_count=4, vocab_size=8192, n_init=128, channels=3,
                 image_size=256):
        super().__init__()
        self.enc = Encoder(n_hid, n_blk_per_group, group_count, channels, vocab_size)
        self.dec = Decoder(n_init, n_hid, n_blk_per_group, group_count, channels, vocab_size)
        self.channels = channels
        self.num_layers = group_count - 1
        self.num_tokens = vocab_size
        self.image_size = image_size
        self.hparams = dict(n_hid=n_hid, n_blk_per_group=n_blk_per_group, group_count=group_count,
                            vocab_size=vocab_size, n_init=n_init, channels=channels, image_size=image_size)

    @classmethod
    def from_config(cls, cfg: dict) -> "OpenAIDiscreteVAE":
        """Build from the dict written by `to_config()` (missing keys take the published model's values)."""
        return cls(**{k: v for k, v in cfg.items() if k != "vae_type"})

    def to_config(self) -> dict:
        """Flat JSON-serialisable config for the project's config.json."""
        return {"vae_type": "openai_dvae", **self.hparams}

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] -> token ids (b, h*w), long (argmax of the encoder logits)."""
        param = self.enc.blocks.input.w
        logits = self.enc(map_pixels(images.to(device=param.device, dtype=param.dtype)))
        return logits.argmax(dim=1).flatten(1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (b, n) with n a square, or (b, h, w) -> images (b, 3, H, W) in [0, 1]."""
        ids = token_grid(ids)
        param = self.dec.blocks.input.w
        z = F.one_hot(ids.to(param.device), num_classes=self.num_tokens).permute(0, 3, 1, 2).to(param.dtype)
        stats = self.dec(z).float()
        return unmap_pixels(torch.sigmoid(stats[:, : self.channels]))


def config_from_state_dict(state_dict: dict, prefix: str = "") -> dict:
    """Read the constructor arguments of an OpenAIDiscreteVAE from tensor shapes under `{prefix}enc.` / `{prefix}dec.`
    (e.g. prefix "vae." for a DALLE-pytorch checkpoint)."""
    def shape(key):
        if prefix + key not in state_dict:
            raise ValueError(f"State dict has no {prefix + key!r}, so it does not hold an OpenAI dVAE "
                             f"under {prefix!r}.")
        return tuple(state_dict[prefix + key].shape)

    enc_keys = [k[len(prefix + "enc.blocks."):] for k in state_dict if k.startswith(prefix + "enc.blocks.group_")]
    group_count = len({k.split(".")[0] for k in enc_keys})
    n_blk = len({k.split(".")[1] for k in enc_keys if k.startswith("group_1.")})
    n_hid, channels = shape("enc.blocks.input.w")[:2]
    return dict(n_hid=n_hid, n_blk_per_group=n_blk, group_count=group_count,
                vocab_size=shape("enc.blocks.output.conv.w")[0], n_init=shape("dec.blocks.input.w")[0],
                channels=channels)


def convert_pickles(encoder_pkl: str, decoder_pkl: str, out_path: str) -> dict:
    """Trusted one-time step: unpickle OpenAI's `encoder.pkl` / `decoder.pkl` (needs the `dall_e` package) and
    save their weights as `enc.*` / `dec.*` tensors in a safetensors file. Returns the inferred config."""
    try:
        import dall_e  # noqa: F401  (the pickles reference dall_e classes)
    except ImportError as e:
        raise SystemExit("The `dall_e` package is needed to read OpenAI's pickles: pip install DALL-E attrs") from e
    import json

    from safetensors.torch import save_file

    state = {}
    for prefix, path in (("enc.", encoder_pkl), ("dec.", decoder_pkl)):
        # These files are pickled modules from OpenAI's CDN: only run this on files you trust.
        module = torch.load(path, map_location="cpu", weights_only=False)
        state.update({prefix + k: v.detach().float().contiguous() for k, v in module.state_dict().items()})
    config = config_from_state_dict(state)
    OpenAIDiscreteVAE(**config).load_state_dict(state, strict=True)  # shape check before writing
    metadata = {"config": json.dumps({"vae_type": "openai_dvae", **config, "image_size": 256})}
    save_file(state, out_path, metadata=metadata)
    return config


def main(argv: list[str]) -> None:
    """CLI: `python -m dalle_app.models.openai_dvae convert encoder.pkl decoder.pkl OUT.safetensors`."""
    if len(argv) != 4 or argv[0] != "convert":
        raise SystemExit("usage: python -m dalle_app.models.openai_dvae convert encoder.pkl decoder.pkl "
                         "OUT.safetensors")
    config = convert_pickles(*argv[1:])
    print(f"wrote {argv[3]} ({config})")


if __name__ == "__main__":
    main(sys.argv[1:])
