"""DiscreteVAE of DALLE-pytorch: a convolutional encoder to codebook logits, a codebook, and a transposed-conv decoder.

State-dict keys are those of DALLE-pytorch 1.6.6 (`encoder.{j}...`, `decoder.{j}...`, `codebook.weight`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_NORMALIZATION = ((0.5,) * 3 + (0.0,), (0.5,) * 3 + (1.0,))


def token_grid(ids: torch.Tensor) -> torch.Tensor:
    """Token ids (b, n) with n a square, or already (b, h, w), as a (b, h, w) grid in raster order."""
    if ids.dim() == 2:
        side = math.isqrt(ids.shape[1])
        if side * side != ids.shape[1]:
            raise ValueError(f"Cannot decode {ids.shape[1]} tokens as a square grid; pass ids shaped (b, h, w).")
        ids = ids.reshape(ids.shape[0], side, side)
    return ids


def edge_positions(images: torch.Tensor, fmap_size: int, threshold: float = 1e-3) -> torch.Tensor:
    """(b, fmap, fmap) float mask of the token positions whose image patch is not one flat colour: the pixel
    variance of the patch, summed over channels, is above `threshold` (images in [0, 1])."""
    patch = images.shape[-1] // fmap_size
    mean = F.avg_pool2d(images.float(), patch)
    var = F.avg_pool2d(images.float() ** 2, patch) - mean ** 2
    return (var.sum(dim=1) > threshold).float()


def edge_pixel_weights(images: torch.Tensor, fmap_size: int, edge_weight: float) -> torch.Tensor:
    """(b, H, W) reconstruction-loss weights: 1 + edge_weight on the pixels of the patches that `edge_positions`
    marks, 1 elsewhere."""
    patch = images.shape[-1] // fmap_size
    edges = edge_positions(images, fmap_size).repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return 1.0 + edge_weight * edges


class ResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv1x1, plus the input (keys `net.0/2/4`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        return self.net(x) + x


class DiscreteVAE(nn.Module):
    """Discrete VAE with DALLE-pytorch's constructor arguments; images go in as [0, 1], `decode` returns [-1, 1]-ish."""

    def __init__(self, image_size=256, num_tokens=512, codebook_dim=512, num_layers=3, num_resnet_blocks=0,
                 hidden_dim=64, channels=3, smooth_l1_loss=False, temperature=0.9, straight_through=False,
                 reinmax=False, kl_div_loss_weight=0.0, normalization=DEFAULT_NORMALIZATION):
        super().__init__()
        if num_layers < 1:
            raise ValueError("DiscreteVAE needs num_layers >= 1.")
        if image_size % (2 ** num_layers) != 0:
            raise ValueError(f"image_size {image_size} must be divisible by 2**num_layers = {2 ** num_layers}.")
        self.image_size, self.num_tokens, self.num_layers, self.channels = image_size, num_tokens, num_layers, channels
        self.codebook_dim, self.hidden_dim, self.num_resnet_blocks = codebook_dim, hidden_dim, num_resnet_blocks
        self.temperature, self.straight_through, self.reinmax = temperature, straight_through, reinmax
        self.smooth_l1_loss, self.kl_div_loss_weight = smooth_l1_loss, kl_div_loss_weight
        self.normalization = tuple(tuple(n[:channels]) for n in normalization) if normalization else None

        self.codebook = nn.Embedding(num_tokens, codebook_dim)

        enc = []
        for j in range(num_layers):
            enc.append(nn.Sequential(nn.Conv2d(channels if j == 0 else hidden_dim, hidden_dim, 4, stride=2, padding=1),
                                     nn.ReLU()))
        enc += [ResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        enc.append(nn.Conv2d(hidden_dim, num_tokens, 1))
        self.encoder = nn.Sequential(*enc)

        dec = []
        if num_resnet_blocks > 0:
            dec.append(nn.Conv2d(codebook_dim, hidden_dim, 1))
            dec += [ResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        for j in range(num_layers):
            first_in = codebook_dim if (j == 0 and num_resnet_blocks == 0) else hidden_dim
            dec.append(nn.Sequential(nn.ConvTranspose2d(first_in, hidden_dim, 4, stride=2, padding=1), nn.ReLU()))
        dec.append(nn.Conv2d(hidden_dim, channels, 1))
        self.decoder = nn.Sequential(*dec)

    @property
    def fmap_size(self) -> int:
        """Side of the token grid."""
        return self.image_size // (2 ** self.num_layers)

    def config(self) -> dict:
        """Constructor arguments, as DALLE-pytorch's `vae_params` / train_vae.py `hparams`."""
        return dict(image_size=self.image_size, num_tokens=self.num_tokens, codebook_dim=self.codebook_dim,
                    num_layers=self.num_layers, num_resnet_blocks=self.num_resnet_blocks,
                    hidden_dim=self.hidden_dim, channels=self.channels)

    def norm(self, images: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images to the normalised space the encoder was trained on (not in place)."""
        if self.normalization is None:
            return images
        means, stds = (torch.tensor(t, device=images.device, dtype=images.dtype)[:, None, None]
                       for t in self.normalization)
        return (images - means) / stds

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Codebook logits (b, num_tokens, h, w) for images in [0, 1]."""
        return self.encoder(self.norm(images))

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids (b, h*w) in raster order for images (b, channels, size, size) in [0, 1]."""
        return self.logits(images).argmax(dim=1).flatten(1)

    def decode(self, img_seq: torch.Tensor) -> torch.Tensor:
        """Images (b, channels, size, size) in the normalised space (about [-1, 1]) from token ids (b, h*w)."""
        embeds = self.codebook(token_grid(img_seq))  # (b, h, w, d)
        return self.decoder(embeds.permute(0, 3, 1, 2))

    def to_unit_range(self, decoded: torch.Tensor) -> torch.Tensor:
        """Map `decode` output back to [0, 1] images (inverse of `norm`, clamped)."""
        if self.normalization is not None:
            means, stds = (torch.tensor(t, device=decoded.device, dtype=decoded.dtype)[:, None, None]
                           for t in self.normalization)
            decoded = decoded * stds + means
        return decoded.clamp(0, 1)

    def forward(self, img, return_loss=False, return_recons=False, return_logits=False, temp=None, usage_weight=0.0,
                usage_mask=None, pixel_weight=None):
        """Training forward: Gumbel-softmax relaxation, reconstruction (+ KL to uniform) loss, as DALLE-pytorch.

        usage_weight (this project's addition, 0 = the reference's loss): adds usage_weight * (log K - H), H the
        entropy of the codebook distribution averaged over the batch and positions, K the codebook size; it keeps
        the whole codebook in use (without it the built-in model's VAE came to use 30 of its 512 codes).
        usage_mask: optional (b, h, w) weights of the token positions that H averages over (e.g. only the positions
        that hold an edge, `edge_positions`), so plain areas may keep few codes.
        pixel_weight: optional (b, H, W) weights of the pixels in the reconstruction loss (a weighted mean), e.g.
        `edge_pixel_weights`, so the few pixels of small shapes' outlines count for more than plain background."""
        logits = self.logits(img)
        if return_logits:
            return logits
        temp = temp if temp is not None else self.temperature
        one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=self.straight_through)
        if self.straight_through and self.reinmax:
            # ReinMax second-order straight-through estimator
            one_hot = one_hot.detach()
            pi0 = logits.softmax(dim=1)
            pi1 = (one_hot + (logits / temp).softmax(dim=1)) / 2
            pi1 = ((pi1.log() - logits).detach() + logits).softmax(dim=1)
            pi2 = 2 * pi1 - 0.5 * pi0
            one_hot = pi2 - pi2.detach() + one_hot
        sampled = torch.einsum("b n h w, n d -> b d h w", one_hot, self.codebook.weight)
        out = self.decoder(sampled)
        if not return_loss:
            return out
        target = self.norm(img)
        loss_fn = F.smooth_l1_loss if self.smooth_l1_loss else F.mse_loss
        if pixel_weight is None:
            recon_loss = loss_fn(target, out)
        else:
            w = pixel_weight[:, None].to(out.dtype)
            recon_loss = (loss_fn(target, out, reduction="none") * w).sum() / (w.sum() * out.shape[1]).clamp_min(1.0)
        log_qy = F.log_softmax(logits.flatten(2).transpose(1, 2), dim=-1)
        log_uniform = torch.log(torch.tensor([1.0 / self.num_tokens], device=img.device))
        kl_div = F.kl_div(log_uniform, log_qy, None, None, "batchmean", log_target=True)
        loss = recon_loss + kl_div * self.kl_div_loss_weight
        if usage_weight:
            q = log_qy.exp()  # (b, h*w, K)
            if usage_mask is None:
                mean_q = q.mean(dim=(0, 1))
            else:
                w = usage_mask.flatten(1).to(q.dtype)[..., None]
                mean_q = (q * w).sum(dim=(0, 1)) / w.sum().clamp_min(1.0)
            entropy = -(mean_q * mean_q.clamp_min(1e-12).log()).sum()
            loss = loss + usage_weight * (math.log(self.num_tokens) - entropy)
        return (loss, out) if return_recons else loss
