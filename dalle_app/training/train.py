"""The training loop: phase 1 DiscreteVAE, then DALLE with a CLIP reranker trained on the same batches.

Runs until the recipe's steps are done or the wall-clock budget is spent, saving one resumable checkpoint
(models, optimizers, step, phase, history, RNG) that the next call continues from, then exports the project format.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..models import CLIP, DALLE, DiscreteVAE
from ..models.vae import edge_pixel_weights, edge_positions
from ..tokenizers.yttm import YttmTokenizer
from ..world import ShapesBatches, ShapesDataset
from .config import TrainConfig
from .curves import draw_loss_curves
from .state import compact_optimizer, expand_optimizer, load_state, rng_state, save_state, set_rng_state

TOKENIZER_FILE = Path(__file__).with_name("shapes_yttm.bpe")
GUIDED_COND_SCALE = 1.5  # written as the exported model's recommended guidance (see export)
# and its recommended top-k (v7: 16 beat 32 and 64 on colour, shape and both objects; v8 at temperature 0.9, four sets
# of 500 captions on the CPU: 8 against 16 raised colour on every set, 95.2 -> 95.9% on average, the rest equal
# within noise; benchmarks/results/topk_v8_2026-12-07_session15.md)
GUIDED_TOP_K = 8
# and temperature (v8, four sets of 500 captions on the CPU: 0.9 against 1 raised colour 94.7 -> 95.2% and both
# objects 73.6 -> 76.5% on average; benchmarks/results/temperature_v8_2026-12-07_session14.md)
GUIDED_TEMPERATURE = 0.9


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of image batches in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).mean()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    """Holds models, optimizers and progress; `run(seconds)` trains and checkpoints."""

    def __init__(self, cfg: TrainConfig, state_dir: str | Path, device: torch.device, shard_mib: float | None = None,
                 overrides: list[str] = ()):
        """`cfg` is the recipe of a fresh run; a checkpoint in `state_dir` brings its own recipe, and `overrides`
        ("name=value", see `TrainConfig.override`) then apply on top of whichever recipe is used."""
        saved = load_state(state_dir)
        if saved is not None and "config" in saved:
            cfg = TrainConfig(**saved["config"])
        cfg.override(list(overrides))
        if cfg.vae_usage_on not in ("all", "edges"):
            raise ValueError(f"vae_usage_on must be 'all' or 'edges', not {cfg.vae_usage_on!r}.")
        self.cfg, self.state_dir, self.device, self.shard_mib = cfg, Path(state_dir), device, shard_mib
        self.tokenizer = YttmTokenizer(TOKENIZER_FILE, backend="python")
        torch.manual_seed(cfg.seed)
        self.vae = DiscreteVAE(**cfg.vae).to(device)
        self.dalle = DALLE(vae=self.vae, num_text_tokens=self.tokenizer.vocab_size, text_seq_len=cfg.text_seq_len,
                           **cfg.dalle).to(device)
        self.clip = (CLIP(num_text_tokens=self.tokenizer.vocab_size, text_seq_len=cfg.text_seq_len,
                          num_visual_tokens=cfg.vae["num_tokens"], **cfg.clip).to(device) if cfg.clip else None)
        self.opt_vae = torch.optim.Adam(self.vae.parameters(), lr=cfg.vae_lr)
        dalle_params = [p for n, p in self.dalle.named_parameters() if not n.startswith("vae.")]
        self.opt_dalle = torch.optim.AdamW(dalle_params, lr=cfg.dalle_lr, betas=(0.9, 0.96),
                                           weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        # the training forward and loss, compiled on CUDA when the recipe asks (sampling keeps the eager module)
        self._dalle_loss = self._eager_dalle_loss
        if cfg.dalle_compile and device.type == "cuda":
            self._dalle_loss = torch.compile(self._eager_dalle_loss, dynamic=False)
        self.opt_clip = torch.optim.AdamW(self.clip.parameters(), lr=cfg.clip_lr, weight_decay=cfg.weight_decay) \
            if self.clip else None
        self.phase, self.step, self.clip_step = "vae", 0, 0
        self._fit_ceiling: int | None = None  # the recipe's step count while a budget fit is provisional
        self._rewarm_from: int | None = None  # the step a DALLE phase resumed at with a fresh optimizer
        self.history: dict[str, list] = {}
        self.seconds = 0.0  # training time summed over all runs
        self.throughput: dict[str, dict] = {}  # this call's speed per phase (steps/s, share spent waiting for data)
        if saved is not None:
            self._restore(saved)

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def _tree(self) -> dict:
        tree = {"config": self.cfg.to_dict(), "phase": self.phase, "step": self.step, "clip_step": self.clip_step, "seconds": self.seconds,
                "history": {k: [list(p) for p in v] for k, v in self.history.items()},
                "vae": self.vae.state_dict(), "dalle": {k: v for k, v in self.dalle.state_dict().items()
                                                        if not k.startswith("vae.")},
                "opt_dalle": compact_optimizer(self.opt_dalle.state_dict()), "rng": rng_state()}
        if self.phase == "vae":
            tree["opt_vae"] = compact_optimizer(self.opt_vae.state_dict())
        if self.clip is not None:
            tree["clip"] = self.clip.state_dict()
            tree["opt_clip"] = compact_optimizer(self.opt_clip.state_dict())
        return tree

    def save(self) -> None:
        save_state(self._tree(), self.state_dir, self.shard_mib)

    def _checkpoint(self, on_save: Callable[[], None] | None) -> None:
        """save(), then the caller's on_save hook (see `run`)."""
        self.save()
        if on_save is not None:
            on_save()

    def restart_clip(self) -> None:
        """Re-initialise CLIP and its optimizer; it trains again (alone, if DALLE is done)."""
        torch.manual_seed(self.cfg.seed + 1)
        self.clip = CLIP(num_text_tokens=self.tokenizer.vocab_size, text_seq_len=self.cfg.text_seq_len,
                         num_visual_tokens=self.cfg.vae["num_tokens"], **self.cfg.clip).to(self.device)
        self.opt_clip = torch.optim.AdamW(self.clip.parameters(), lr=self.cfg.clip_lr,
                                          weight_decay=self.cfg.weight_decay)
        self.clip_step = 0
        self.history["clip"] = []  # the curve of the new attempt only
        if self.phase == "done":
            self.phase, self.step = "clip", 0

    def save_weights(self, folder, dtype: torch.dtype = torch.float16) -> None:
        """Models, history and times only (no optimizers; parameters in `dtype`): a small checkpoint to export
        from elsewhere, or to resume from with fresh optimizers."""
        tree = {k: v for k, v in self._tree().items() if not k.startswith("opt_") and k != "rng"}
        modules = {"vae": self.vae, "dalle": self.dalle, "clip": self.clip}
        for name, module in modules.items():
            if name in tree and module is not None:
                params = dict(module.named_parameters(remove_duplicate=False))
                tree[name] = {k: (v.to(dtype) if k in params else v) for k, v in tree[name].items()}
        save_state(tree, folder, self.shard_mib)

    def _restore(self, tree: dict) -> None:
        self.phase, self.step, self.seconds = tree["phase"], tree["step"], tree["seconds"]
        self.history = {k: [tuple(p) for p in v] for k, v in tree["history"].items()}
        self.vae.load_state_dict(tree["vae"])
        self.dalle.load_state_dict(tree["dalle"], strict=False)
        self.clip_step = tree.get("clip_step", 0)
        if "opt_dalle" in tree:
            self.opt_dalle.load_state_dict(expand_optimizer(tree["opt_dalle"]))
        elif self.phase == "dalle" and self.step > 0:
            self._rewarm_from = self.step  # fresh Adam moments mid-run: warm up again rather than jolt the weights
        if "opt_vae" in tree:
            self.opt_vae.load_state_dict(expand_optimizer(tree["opt_vae"]))
        clip_ok = "clip" in tree and all(torch.isfinite(v).all() for v in tree["clip"].values())
        if self.clip is not None and clip_ok:
            self.clip.load_state_dict(tree["clip"])
            if "opt_clip" in tree:
                self.opt_clip.load_state_dict(expand_optimizer(tree["opt_clip"]))
        elif self.clip is not None:
            print("the checkpoint has no usable CLIP (missing or not finite): CLIP starts afresh")
            self.clip_step = 0
        if "rng" in tree:
            set_rng_state(tree["rng"])
        print(f"resumed from {self.state_dir}: phase {self.phase}, step {self.step}, {self.seconds / 60:.1f} min so far")

    # -- data ----------------------------------------------------------------------------------------------------
    def _loader(self, batch: int):
        """Endless (images in [0, 1] on the device, token ids) batches; workers render whole uint8 batches."""
        cfg = self.cfg
        # a new data seed per resume point, so a resumed run does not replay the same images
        ds = ShapesBatches(batch, seed=cfg.seed * 100003 + self.step + (0 if self.phase == "vae" else 50_000_000),
                           image_size=cfg.image_size)
        dl = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers else None)
        for images, captions in dl:
            text = self.tokenizer.tokenize(list(captions), self.cfg.text_seq_len, truncate_text=True)
            images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            yield images, text.to(self.device)

    def _log(self, name: str, value: float) -> None:
        self.history.setdefault(name, []).append((self.step, float(value)))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # -- phases --------------------------------------------------------------------------------------------------
    def _vae_step(self, images) -> dict:
        cfg = self.cfg
        frac = self.step / cfg.vae_steps
        temp = cfg.vae_temp_start * (cfg.vae_temp_end / cfg.vae_temp_start) ** min(1.0, frac / cfg.vae_hard_from)
        self.vae.straight_through = frac >= cfg.vae_hard_from
        self.vae.kl_div_loss_weight = cfg.vae_kl_weight
        for g in self.opt_vae.param_groups:
            g["lr"] = lr_at(self.step, cfg.vae_steps, cfg.vae_lr, 100)
        self.vae.train()
        usage_mask = None
        if cfg.vae_usage_weight and cfg.vae_usage_on == "edges":
            usage_mask = edge_positions(images, self.vae.fmap_size)
        pixel_weight = None
        if cfg.vae_edge_loss_weight:
            pixel_weight = edge_pixel_weights(images, self.vae.fmap_size, cfg.vae_edge_loss_weight)
        with self._autocast():
            loss = self.vae(images, return_loss=True, temp=temp, usage_weight=cfg.vae_usage_weight,
                            usage_mask=usage_mask, pixel_weight=pixel_weight)
        self.opt_vae.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.vae_grad_clip:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.vae_grad_clip)
        self.opt_vae.step()
        out = {"vae": loss.detach(), "temp": temp}
        if self.step % self.cfg.log_every == 0:
            psnr_db, out["codes"] = self._vae_check(images)
            out["psnr"] = psnr_db.item()
        return out

    @torch.no_grad()
    def _vae_check(self, images) -> tuple[torch.Tensor, int]:
        """(PSNR of the VAE's reconstructions of `images`, how many codebook entries they use: collapse shows here)."""
        self.vae.eval()
        ids = self.vae.get_codebook_indices(images)
        recon = self.vae.to_unit_range(self.vae.decode(ids).float())
        return psnr(recon, images), int(ids.unique().numel())

    def _dalle_step(self, images, text, train_dalle: bool = True) -> dict:
        cfg = self.cfg
        out = {}
        if train_dalle:
            out = self._dalle_only(images, text)
        else:
            with torch.no_grad():
                ids = self.vae.get_codebook_indices(images)
        ids = self._last_ids if train_dalle else ids
        return self._clip_part(ids, text, out)

    def _dalle_only(self, images, text) -> dict:
        cfg = self.cfg
        for g in self.opt_dalle.param_groups:
            g["lr"] = self._dalle_lr()
        self.vae.eval()
        with torch.no_grad(), self._autocast():
            ids = self.vae.get_codebook_indices(images)
        self.dalle.train()
        with self._autocast():
            loss = self._dalle_loss(text, ids)
        self.opt_dalle.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.opt_dalle.param_groups[0]["params"], 1.0)
        self.opt_dalle.step()
        self._last_ids = ids
        return {"dalle": loss.detach()}  # a tensor: read (a device sync) only when logged

    def _dalle_lr(self) -> float:
        cfg = self.cfg
        lr = lr_at(self.step, cfg.dalle_steps, cfg.dalle_lr, cfg.warmup)
        if self._rewarm_from is not None:
            lr *= min(1.0, (self.step - self._rewarm_from + 1) / cfg.warmup)
        return lr

    def _eager_dalle_loss(self, text, ids):
        return self.dalle(text, ids, return_loss=True, null_cond_prob=self.cfg.null_cond_prob)

    def _clip_part(self, ids, text, out: dict) -> dict:
        cfg = self.cfg
        if self.clip is not None and self.clip_step < cfg.clip_steps:
            for g in self.opt_clip.param_groups:
                g["lr"] = lr_at(self.clip_step, cfg.clip_steps, cfg.clip_lr, cfg.warmup)
            with torch.no_grad(), self._autocast():  # CLIP sees what it will rerank: decoder output, in its space
                decoded = self.vae.decode(ids).float().clamp(-1, 1)
            self.clip.train()
            closs = self.clip(text, decoded, text_mask=text != 0, return_loss=True)  # float32: bf16 went NaN
            self.opt_clip.zero_grad(set_to_none=True)
            if not torch.isfinite(closs):  # skip a bad batch rather than poison the weights
                out["clip"] = float("nan")
                return out
            closs.backward()
            torch.nn.utils.clip_grad_norm_(self.clip.parameters(), 1.0)
            self.opt_clip.step()
            with torch.no_grad():  # logit scale at most 100, as in OpenAI's CLIP; unbounded it overflows
                self.clip.temperature.clamp_(max=math.log(100))
            self.clip_step += 1
            out["clip"] = closs.item()
        return out

    # -- driver --------------------------------------------------------------------------------------------------
    def _fit_steps(self, rate: float, seconds_spent: float, final: bool = True) -> None:
        """Fix the current phase's step count (vae_steps or dalle_steps) from the measured speed (steps/s) so that
        the phase fits its budget (`vae_budget_minutes` / `dalle_budget_minutes`), never more steps than the
        recipe's; the learning-rate (and Gumbel temperature) schedules follow, since they are barely started.
        final=False keeps the budget for a second fit (the DALLE runs faster once CLIP has finished)."""
        cfg, phase = self.cfg, self.phase
        budget, recipe_steps = getattr(cfg, f"{phase}_budget_minutes"), getattr(cfg, f"{phase}_steps")
        if self._fit_ceiling is None:
            self._fit_ceiling = recipe_steps  # a provisional fit must not lower the ceiling of the final one
        recipe_steps = self._fit_ceiling
        fitted = int(self.step + rate * max(0.0, budget * 60 - seconds_spent))
        print(f"{phase}: {rate:.1f} steps/s; {budget:g} min allow {fitted} steps (recipe: at most {recipe_steps})")
        setattr(cfg, f"{phase}_steps", max(self.step + 1, min(recipe_steps, fitted)))
        if final:
            setattr(cfg, f"{phase}_budget_minutes", 0.0)
            self._fit_ceiling = None

    def run(self, seconds: float, save_every: float = 120.0, stop_at_phase: str | None = None,
            on_save: Callable[[], None] | None = None) -> bool:
        """Train for at most `seconds` (wall clock), or until phase `stop_at_phase` begins; returns True when every
        phase is done. on_save: called after every checkpoint (e.g. to copy it somewhere safe)."""
        start = last_save = time.time()
        while self.phase not in ("done", stop_at_phase) and seconds > 0:
            total = {"vae": self.cfg.vae_steps, "dalle": self.cfg.dalle_steps, "clip": self.cfg.clip_steps}[self.phase]
            batch = self.cfg.vae_batch if self.phase == "vae" else self.cfg.dalle_batch
            self.vae.requires_grad_(self.phase == "vae")
            bar = tqdm(total=total, initial=self.step, desc=self.phase, mininterval=5, dynamic_ncols=True)
            t0 = time.time()
            out_of_time = False
            waited, ran, t_fetch, t_first, regime_start = 0.0, 0, time.time(), None, 0
            for images, text in self._loader(batch):
                if t_first is None:  # the first batch also waits for the workers to start: not counted
                    t_first = time.time()
                else:
                    waited += time.time() - t_fetch
                if self.step >= total:
                    break
                logs = self._vae_step(images) if self.phase == "vae" else self._dalle_step(
                    images, text, train_dalle=self.phase == "dalle")
                if self.step % self.cfg.log_every == 0:
                    for k, v in logs.items():
                        if k != "temp":
                            self._log(k, v)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
                self.step += 1
                ran += 1
                bar.update(1)
                if getattr(self.cfg, f"{self.phase}_budget_minutes", 0.0) > 0:
                    # speed measured past the first steps of a regime (cuDNN autotuning, workers starting, compile)
                    if ran - regime_start == 20:
                        t_rate = time.time()
                    elif ran - regime_start == 120:
                        clip_left = self.cfg.clip_steps - self.clip_step if self.phase == "dalle" and self.clip else 0
                        final = clip_left <= 0 or self.step + clip_left >= self.cfg.dalle_steps
                        self._fit_steps(100 / (time.time() - t_rate), time.time() - t_first, final=final)
                        total = bar.total = getattr(self.cfg, f"{self.phase}_steps")
                        if not final:  # measure again once CLIP has finished: the steps alone are faster
                            regime_start = ran + clip_left
                now = time.time()
                if now - start > seconds:
                    out_of_time = True
                    break
                if now - last_save > save_every:
                    self.seconds += now - t0
                    t0 = last_save = now
                    self._checkpoint(on_save)
                t_fetch = time.time()
            bar.close()
            self.seconds += time.time() - t0
            if ran > 1:
                spent = time.time() - t_first
                self.throughput[self.phase] = {"steps": ran, "steps_per_s": ran / spent,
                                               "data_wait_fraction": waited / spent}
                print(f"{self.phase}: {ran} steps at {ran / spent:.1f} steps/s, waiting for data "
                      f"{100 * waited / spent:.0f}% of the time")
            if out_of_time:
                self._checkpoint(on_save)
                return False
            if self.phase in ("vae", "dalle"):  # ended before the fit: the recipe's steps were taken
                setattr(self.cfg, f"{self.phase}_budget_minutes", 0.0)
            self.phase, self.step = ("dalle", 0) if self.phase == "vae" else ("done", 0)
            if self.phase == "done" and self.clip is not None and self.clip_step < self.cfg.clip_steps:
                self.phase, self.step = "clip", self.clip_step  # CLIP was restarted: finish it alone
            self._checkpoint(on_save)
        return self.phase == "done"

    def plot(self, path) -> None:
        """Loss curves PNG (VAE loss and PSNR, DALLE loss, CLIP loss)."""
        draw_loss_curves(self.history, path)

    @torch.no_grad()
    def vae_psnr(self, n: int = 256) -> float:
        """VAE PSNR (dB, [0, 1] space) on n fresh renders from a stream not used for training."""
        ds = iter(ShapesDataset(seed=987654, image_size=self.cfg.image_size))
        images = torch.stack([next(ds)[0] for _ in range(n)]).to(self.device)
        return self._vae_check(images)[0].item()

    def export(self, folder, card: str | None = None, dtype: torch.dtype = torch.float16) -> Path:
        """Write the project format with the tokenizer; parameters stored in `dtype` (float16 halves the files;
        loading casts them to the dtype the model runs in)."""
        import copy

        from ..manager.pretrained import save_pretrained

        hp = dict(self.dalle.hparams)
        conv_like_window = hp.pop("conv_like_window", "above_left")
        config = {"dalle": hp, "vae": {"kind": "DiscreteVAE", "params": self.vae.config()},
                  "conv_like_window": conv_like_window,
                  "clip": {"params": self.clip.config} if self.clip is not None else None,
                  "tokenizer": {"kind": "yttm"},
                  "source": {"trained_by": "python -m dalle_app.training", "train_seconds": round(self.seconds),
                             "stored_dtype": str(dtype).replace("torch.", ""),
                             # trained with null_cond_prob, so guidance works: the app starts at these values
                             # (v5 on 500 captions: guidance 1.5 beat 3 on every attribute; 3 drew extra objects;
                             # top-k and temperature: see GUIDED_TOP_K and GUIDED_TEMPERATURE)
                             "recommended_sampling": {"cond_scale": GUIDED_COND_SCALE if self.cfg.null_cond_prob > 0
                                                      else 1.0,
                                                      "top_k": GUIDED_TOP_K,
                                                      "temperature": GUIDED_TEMPERATURE}}}
        def stored(module):  # parameters in `dtype`; buffers (rotary angles) stay float32: they need the precision
            module = copy.deepcopy(module)
            for p in module.parameters():
                p.data = p.data.to(dtype)
            return module

        dalle = stored(self.dalle)
        clip = stored(self.clip) if self.clip is not None else None
        return save_pretrained(folder, dalle=dalle, clip=clip, tokenizer_file=TOKENIZER_FILE, card=card,
                               config=config)
