"""Training recipes. `v5` (the default, `TrainConfig()`) made the shipped weights: v4's DALLE on the widest VAE of a
four-way sweep (`vae_sweep`, session 6). `v1` made the weights shipped before; `v2` has a sharper VAE (session 2, not
shipped: its DALLE was trained too briefly); `v3` adds the codebook-usage term (session 5, not shipped: ghost
objects); `v4` is v2's VAE with twice v1's DALLE steps; `v6` (proposed in session 7) is v5 with the usage term on
edges only and twice the DALLE steps; `v7` (session 8) adds an edge-weighted reconstruction loss and a
compiled DALLE; `quick` is tiny, for CPUs and tests. `RECIPES[name]()` builds one."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (phases run in order: VAE, then DALLE and CLIP together)."""

    image_size: int = 128
    text_seq_len: int = 32
    # phase 1: DiscreteVAE
    vae: dict = field(default_factory=lambda: dict(image_size=128, num_layers=3, num_tokens=1024, codebook_dim=256,
                                                   hidden_dim=192, num_resnet_blocks=3))
    vae_steps: int = 2568
    vae_batch: int = 128
    vae_lr: float = 4e-4
    vae_grad_clip: float = 1.0  # 0 = no clipping
    vae_temp_start: float = 1.0
    vae_temp_end: float = 1 / 16
    vae_hard_from: float = 0.7  # fraction of VAE steps after which sampling is straight-through (hard)
    vae_kl_weight: float = 0.0
    # > 0: size vae_steps to this many minutes, like dalle_budget_minutes below
    vae_budget_minutes: float = 0.0
    # this project's codebook-usage term (DiscreteVAE.forward usage_weight); 0 but in v3 (v1's VAE uses ~30 codes)
    vae_usage_weight: float = 0.0
    # where the usage term looks: "all" token positions (v3: ghost blobs in plain background), or "edges", the
    # positions whose patch is not one flat colour (shape outlines), so plain areas may keep one code per colour
    vae_usage_on: str = "all"
    # > 0: the reconstruction loss weighs the pixels of edge patches (shape outlines, `edge_pixel_weights`) by
    # 1 + this, so small shapes are not sacrificed to the plain background that fills most of each image
    vae_edge_loss_weight: float = 0.0
    # phase 2: DALLE (+ phase 3: CLIP, trained on the same batches)
    dalle: dict = field(default_factory=lambda: dict(dim=256, depth=6, heads=8, dim_head=32, attn_types=("full",),
                                                     shift_tokens=True, rotary_emb=True, loss_img_weight=7))
    dalle_steps: int = 7187
    # > 0: size dalle_steps to this many minutes of DALLE training, from the speed of its first 100 steps (at most
    # dalle_steps); then set back to 0, so the saved recipe names the steps actually taken
    dalle_budget_minutes: float = 0.0
    dalle_batch: int = 256
    dalle_compile: bool = False  # torch.compile the DALLE's training forward and loss (CUDA only)
    dalle_lr: float = 6e-4
    weight_decay: float = 0.01
    warmup: int = 200
    null_cond_prob: float = 0.15
    clip: dict | None = field(default_factory=lambda: dict(dim_text=192, dim_image=192, dim_latent=192,
                                                           text_enc_depth=2, text_heads=4, visual_enc_depth=2,
                                                           visual_heads=4, visual_image_size=128,
                                                           visual_patch_size=16))
    clip_lr: float = 2e-4
    clip_steps: int = 2400  # CLIP trains on the first clip_steps DALLE batches (after a restart: from then on)
    seed: int = 0
    num_workers: int = 12
    log_every: int = 25

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, assignments: list[str]) -> None:
        """Apply "name=value" strings (value as JSON, e.g. `dalle_steps=20000`, `vae={"hidden_dim": 96}`)."""
        for item in assignments:
            name, sep, raw = item.partition("=")
            if not sep or not hasattr(self, name):
                raise ValueError(f"Cannot set {item!r}: write name=value with a TrainConfig field name.")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            current = getattr(self, name)
            if isinstance(current, dict) and isinstance(value, dict):
                value = {**current, **value}  # a dict value updates the sub-config rather than replacing it
            setattr(self, name, value)


def v1_config() -> TrainConfig:
    """The recipe of the weights shipped until session 6: a 512-code VAE of 64 channels and 1 resnet block (its
    codebook collapsed to ~30 codes), 6,000 DALLE steps."""
    return TrainConfig(vae=dict(image_size=128, num_layers=3, num_tokens=512, codebook_dim=256, hidden_dim=64,
                                num_resnet_blocks=1),
                       vae_steps=3000, vae_batch=64, vae_lr=1e-3, vae_grad_clip=0.0, dalle_steps=6000)


def v2_config() -> TrainConfig:
    """Sharper VAE (128 channels, 2 resnet blocks, 1024 codes: 28.3-28.5 dB instead of 27.1 after 7,000 steps of
    batch 64, 3.2 min on an H100), DALLE batch 128. The learning rate 1e-3 of v1 made this wider VAE collapse
    (14 dB) once the Gumbel temperature fell, hence 4e-4 with gradient clipping. DALLE 5,000 steps were far too few
    for the 1024-code token sequences (see the model card); raise dalle_steps when there is GPU time."""
    return replace(
        v1_config(),
        vae=dict(image_size=128, num_layers=3, num_tokens=1024, codebook_dim=256, hidden_dim=128, num_resnet_blocks=2),
        vae_steps=7000, vae_lr=4e-4, vae_grad_clip=1.0, dalle_steps=5000, dalle_batch=128, clip_steps=2000,
    )


def v3_config() -> TrainConfig:
    """Proposed next recipe, not trained yet (no GPU in session 3): v2's wider VAE with 512 codes and the
    codebook-usage term, so the VAE keeps its codebook in use (v1's VAE uses ~30 of 512 codes, which is why small
    stars, crosses and diamonds come back as blobs), and twice v1's DALLE steps for the richer token sequences.
    On 2 CPU cores for 800 steps of batch 16 the usage term (0.05) kept 307 codes in use against 19 without it, at
    the same PSNR (22.1 / 21.8 dB). Run on an H200 in session 5 and not shipped: 430 codes in use and a much better
    shape bound (80.5% against 56.5%), but ghost blobs in empty background (benchmarks/results/training_v3_*.md)."""
    return replace(
        v1_config(),
        vae=dict(image_size=128, num_layers=3, num_tokens=512, codebook_dim=256, hidden_dim=128, num_resnet_blocks=2),
        vae_steps=7000, vae_lr=4e-4, vae_grad_clip=1.0, vae_usage_weight=0.05, dalle_steps=12000,
    )


def v4_config() -> TrainConfig:
    """Proposed after v3's run (session 5), never trained as a whole: v2's VAE (1024 codes, no usage term: 28.3 dB and a
    shape bound of 74.5% in session 2, with no ghost objects), because v3's usage term kept its codes alive but
    painted blobs of colour into empty background (count bound 54.5%); and the DALLE of v1/v3 (batch 256) with
    twice v1's steps, fitted to the time budget by the candidate command (15.7 steps/s on an H200). Session 6 ran
    its VAE as the `base` variant of a VAE sweep; the `wide` variant became v5."""
    return replace(
        v1_config(),
        vae=dict(image_size=128, num_layers=3, num_tokens=1024, codebook_dim=256, hidden_dim=128, num_resnet_blocks=2),
        vae_steps=7000, vae_lr=4e-4, vae_grad_clip=1.0, dalle_steps=12000,
    )


def v5_config() -> TrainConfig:
    """The shipped weights' recipe (session 6, one H200), = TrainConfig's defaults: a VAE of 192 channels and 3
    resnet blocks, batch 128, 2,568 steps (4 min of a sweep that trained four VAEs side by side); then the v1/v4
    DALLE for 7,187 steps (the time left), CLIP on its first 2,400 batches."""
    return TrainConfig()


def v6_config() -> TrainConfig:
    """Proposed after session 7, not trained as a whole: v5 with the codebook-usage term on edge positions only
    (weight 0.02: in a 4.5-minute sweep 978 codes in use instead of 28, shape bound 75.5% against 64.0%, no ghost
    objects) and twice v5's DALLE steps, which the ~980-code token sequences need (6,854 steps were too few:
    benchmarks/results/training_v6_2026-12-02.md). Takes two GPU leases: resume with candidate --resume-weights."""
    return replace(TrainConfig(), vae_usage_weight=0.02, vae_usage_on="edges", dalle_steps=15000)


def v7_config() -> TrainConfig:
    """Proposed after session 8: v6 with the reconstruction loss weighing shape outlines 13x (`vae_edge_loss_weight`
    12: in a 2,568-step sweep 31.5 dB and a shape bound of 87.0% against v6's 28.8 dB and 71.0%) and a VAE of about
    6 minutes; then the compiled DALLE (34 steps/s on an H200 against 16 eager) for about 15 minutes."""
    return replace(v6_config(), vae_edge_loss_weight=12.0, vae_steps=9000, dalle_steps=32000, dalle_compile=True)


def v8_config() -> TrainConfig:
    """The shipped weights (sessions 11-12): v7 with the step counts its budget fit gave on an H200 (a 4-minute VAE
    of 8,468 steps, then 22,971 compiled DALLE steps) and CLIP on the first 1,600 DALLE batches."""
    return replace(v7_config(), vae_steps=8468, dalle_steps=22971, clip_steps=1600)


def v9_config() -> TrainConfig:
    """v8 trained further (session 14): its DALLE continued from step 22,971 of the shipped weights
    (`candidate --from-model weights/shapes-dalle`) on a cosine schedule stretched to at most 35,000 steps, the count
    fitted to the time a GPU call leaves; the VAE and the hard-negative-tuned CLIP are kept as they are."""
    return replace(v8_config(), dalle_steps=35000)


def quick_config() -> TrainConfig:
    """A tiny recipe that trains in well under a minute on two CPU cores (32 px images, 8x8 tokens)."""
    return TrainConfig(
        image_size=32,
        vae=dict(image_size=32, num_layers=2, num_tokens=64, codebook_dim=32, hidden_dim=16, num_resnet_blocks=0),
        vae_steps=200, vae_batch=16, vae_lr=3e-3, vae_grad_clip=0.0, vae_temp_end=0.3, vae_hard_from=1.0,
        dalle=dict(dim=64, depth=2, heads=2, dim_head=16, attn_types=("full",), shift_tokens=True, rotary_emb=True,
                   loss_img_weight=7),
        dalle_steps=80, dalle_batch=16, dalle_lr=2e-3, warmup=10,
        clip=dict(dim_text=32, dim_image=32, dim_latent=32, text_enc_depth=1, text_heads=2, visual_enc_depth=1,
                  visual_heads=2, visual_image_size=32, visual_patch_size=8),
        clip_lr=5e-3, clip_steps=80, num_workers=0, log_every=5,
    )


RECIPES = {"v1": v1_config, "v2": v2_config, "v3": v3_config, "v4": v4_config, "v5": v5_config, "v6": v6_config,
           "v7": v7_config, "v8": v8_config, "v9": v9_config, "quick": quick_config}
