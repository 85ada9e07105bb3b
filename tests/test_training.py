"""Quick-mode training: losses fall, the checkpoint resumes, and the export loads through the model manager."""

import pytest
import torch

from dalle_app.training import Trainer, quick_config
from dalle_app.training.state import load_state


def _mean(points):
    return sum(v for _, v in points) / len(points)


def test_quick_training_losses_fall_and_export_loads(tmp_path, monkeypatch):
    cfg = quick_config()
    trainer = Trainer(cfg, tmp_path / "state", torch.device("cpu"))
    assert trainer.run(seconds=300)  # ~12 s alone; the budget is a guard, not the measure
    hist = trainer.history
    for name in ("vae", "dalle"):
        pts = hist[name]
        assert _mean(pts[-3:]) < 0.8 * _mean(pts[:3]), (name, pts[:3], pts[-3:])
    clip = hist["clip"]  # contrastive over a batch of 16 on blurry 32 px reconstructions: it falls, slowly
    quarter = len(clip) // 4
    assert _mean(clip[-quarter:]) < _mean(clip[:quarter])
    assert hist["psnr"][-1][1] > hist["psnr"][0][1]

    saved = load_state(tmp_path / "state")
    assert saved["phase"] == "done" and "opt_dalle" in saved
    again = Trainer(cfg, tmp_path / "state", torch.device("cpu"))  # resumes: nothing left to do
    assert again.phase == "done"
    for k, v in trainer.dalle.state_dict().items():
        assert torch.equal(v, again.dalle.state_dict()[k]), k

    monkeypatch.setenv("DALLE_APP_MODEL_DIRS", str(tmp_path))
    from dalle_app.manager import ModelManager
    folder = trainer.export(tmp_path / "model")
    loaded = ModelManager(device="cpu").load(str(folder))
    assert loaded.clip is not None
    text = loaded.tokenizer.tokenize(["a red circle"], cfg.text_seq_len)
    logits = loaded.dalle(text, torch.zeros(1, loaded.dalle.image_seq_len, dtype=torch.long))
    assert torch.isfinite(logits).all()


def test_recipe_overrides_and_resumed_runs_keep_their_recipe(tmp_path):
    cfg = quick_config()
    cfg.override(["dalle_steps=12", 'vae={"hidden_dim": 8}', "num_workers=0"])
    assert cfg.dalle_steps == 12 and cfg.vae["hidden_dim"] == 8 and cfg.vae["num_tokens"] == 64
    with pytest.raises(ValueError):
        cfg.override(["no_such_field=1"])
    trainer = Trainer(cfg, tmp_path / "state", torch.device("cpu"))
    trainer.save()
    again = Trainer(quick_config(), tmp_path / "state", torch.device("cpu"), overrides=["clip_steps=7"])
    assert again.cfg.dalle_steps == 12 and again.vae.hidden_dim == 8 and again.cfg.clip_steps == 7


def test_a_dalle_phase_resumed_with_fresh_optimizers_warms_its_learning_rate_up_again(tmp_path):
    from dalle_app.training.train import lr_at

    trainer = Trainer(quick_config(), tmp_path / "full", torch.device("cpu"), overrides=["num_workers=0"])
    trainer.phase, trainer.step = "dalle", 50
    trainer.save()  # with its optimizers: the schedule goes on as it was
    trainer.save_weights(tmp_path / "weights_only")
    cfg = trainer.cfg
    plain = lr_at(50, cfg.dalle_steps, cfg.dalle_lr, cfg.warmup)
    assert Trainer(quick_config(), tmp_path / "full", torch.device("cpu"))._dalle_lr() == pytest.approx(plain)
    fresh = Trainer(quick_config(), tmp_path / "weights_only", torch.device("cpu"))
    assert fresh.step == 50 and fresh._dalle_lr() == pytest.approx(plain / cfg.warmup)
    fresh.step = 50 + cfg.warmup - 1
    assert fresh._dalle_lr() == pytest.approx(lr_at(fresh.step, cfg.dalle_steps, cfg.dalle_lr, cfg.warmup))


def test_default_recipe_is_the_one_of_the_shipped_weights():
    import json
    from pathlib import Path

    from dalle_app.training import TrainConfig

    from dalle_app.training.config import RECIPES

    shipped = json.loads((Path(__file__).parents[1] / "weights/shapes-dalle/config.json").read_text())
    cfg = RECIPES["v8"]()
    assert {k: getattr(cfg, k) for k in ("dalle_steps", "vae_steps")} == {"dalle_steps": 22971, "vae_steps": 8468}
    assert TrainConfig().vae == cfg.vae
    assert {k: shipped["vae"]["params"][k] for k in cfg.vae} == cfg.vae
    assert all(shipped["dalle"][k] == (list(v) if isinstance(v, tuple) else v) for k, v in cfg.dalle.items())
    assert {k: shipped["clip"]["params"][k] for k in cfg.clip} == cfg.clip


def test_vae_usage_term_is_log_codebook_minus_entropy_of_the_mean_code_distribution():
    import math

    from dalle_app.models import DiscreteVAE

    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=8, codebook_dim=4, hidden_dim=4)
    images = torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    plain = vae(images, return_loss=True, temp=1.0)
    torch.manual_seed(1)  # same Gumbel noise
    regular = vae(images, return_loss=True, temp=1.0, usage_weight=0.5)
    with torch.no_grad():
        q = vae.logits(images).softmax(dim=1).mean(dim=(0, 2, 3))
    expected = 0.5 * (math.log(8) - float(-(q * q.log()).sum()))
    assert expected > 0
    assert float((regular - plain).detach()) == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():  # a collapsed encoder (every position picks code 0) pays the most
        last = vae.encoder[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([20.0] + [0.0] * 7))
    torch.manual_seed(1)
    collapsed = vae(images, return_loss=True, temp=1.0, usage_weight=0.5) - vae(images, return_loss=True, temp=1.0)
    assert float(collapsed.detach()) > expected


def test_edge_positions_mark_patches_that_are_not_one_flat_colour():
    from dalle_app.models.vae import edge_positions

    images = torch.zeros(1, 3, 32, 32)
    images[:, 0] = 0.8  # a flat red background
    images[:, :, 8:16, 8:16] = 0.2  # a square filling patch (1, 1) exactly: flat inside
    images[:, :, 20:28, 18:26] = 1.0  # a square straddling patches (2, 2), (2, 3), (3, 2), (3, 3)
    mask = edge_positions(images, fmap_size=4)
    expected = torch.zeros(1, 4, 4)
    expected[0, 2:4, 2:4] = 1
    assert torch.equal(mask, expected)


def test_usage_term_with_a_mask_counts_only_the_masked_positions():
    import math

    from dalle_app.models import DiscreteVAE

    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=8, codebook_dim=4, hidden_dim=4)
    images = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 4, 4)
    mask[0, 1, 2] = mask[1, 3, 0] = 1
    torch.manual_seed(1)
    plain = vae(images, return_loss=True, temp=1.0)
    torch.manual_seed(1)
    masked = vae(images, return_loss=True, temp=1.0, usage_weight=0.5, usage_mask=mask)
    with torch.no_grad():
        q = vae.logits(images).softmax(dim=1)  # (b, K, h, w)
        mean_q = (q[0, :, 1, 2] + q[1, :, 3, 0]) / 2
    expected = 0.5 * (math.log(8) - float(-(mean_q * mean_q.log()).sum()))
    assert float((masked - plain).detach()) == pytest.approx(expected, rel=1e-4)


def test_edge_pixel_weights_make_the_reconstruction_loss_a_weighted_mean_over_edge_patches():
    from dalle_app.models import DiscreteVAE
    from dalle_app.models.vae import edge_pixel_weights

    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=8, codebook_dim=4, hidden_dim=4)
    images = torch.full((1, 3, 16, 16), 0.5)
    images[:, :, 5:7, 5:7] = 1.0  # a speck inside patch (1, 1) of the 4x4 grid of 4-pixel patches
    weights = edge_pixel_weights(images, vae.fmap_size, edge_weight=3.0)
    assert weights[0, 4:8, 4:8].eq(4.0).all() and weights.sum() == 16 * 16 + 3.0 * 16
    torch.manual_seed(1)
    loss, out = vae(images, return_loss=True, return_recons=True, temp=1.0, pixel_weight=weights)
    err = (out.detach() - vae.norm(images)) ** 2
    expected = (err * weights[:, None]).sum() / (weights.sum() * 3)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) != pytest.approx(float(err.mean()), rel=1e-3)  # the weights changed the loss


def test_trainer_refuses_an_unknown_usage_region(tmp_path):
    with pytest.raises(ValueError, match="vae_usage_on must be"):
        Trainer(quick_config(), tmp_path / "state", torch.device("cpu"), overrides=["vae_usage_on=corners"])


def test_phase_steps_are_fitted_to_the_time_budget_and_the_recipe_then_names_them(tmp_path):
    trainer = Trainer(quick_config(), tmp_path / "state", torch.device("cpu"),
                      overrides=["dalle_steps=10000", "vae_steps=10000"])
    trainer.phase, trainer.step = "dalle", 120
    trainer.cfg.dalle_budget_minutes = 1.0
    trainer._fit_steps(rate=10.0, seconds_spent=20.0)  # 40 s left at 10 steps/s
    assert trainer.cfg.dalle_steps == 520 and trainer.cfg.dalle_budget_minutes == 0
    trainer.cfg.dalle_budget_minutes = 60.0
    trainer._fit_steps(rate=10.0, seconds_spent=20.0)  # the recipe's steps stay the ceiling
    assert trainer.cfg.dalle_steps == 520
    trainer.phase = "vae"  # the VAE phase has its own budget and leaves the DALLE's alone
    trainer.cfg.vae_budget_minutes = 2.0
    trainer._fit_steps(rate=5.0, seconds_spent=0.0)
    assert trainer.cfg.vae_steps == 720 and trainer.cfg.vae_budget_minutes == 0 and trainer.cfg.dalle_steps == 520


def test_a_provisional_fit_keeps_the_budget_and_the_recipe_ceiling_for_the_final_fit(tmp_path):
    trainer = Trainer(quick_config(), tmp_path / "state", torch.device("cpu"), overrides=["dalle_steps=10000"])
    trainer.phase, trainer.step = "dalle", 120
    trainer.cfg.dalle_budget_minutes = 10.0
    trainer._fit_steps(rate=5.0, seconds_spent=0.0, final=False)  # slow while CLIP trains: 3,120 steps so far
    assert trainer.cfg.dalle_steps == 3120 and trainer.cfg.dalle_budget_minutes == 10.0
    trainer.step = 1000
    trainer._fit_steps(rate=20.0, seconds_spent=300.0)  # faster alone: 1000 + 20 * 300, under the recipe's 10,000
    assert trainer.cfg.dalle_steps == 7000 and trainer.cfg.dalle_budget_minutes == 0


def test_candidate_run_trains_exports_evaluates_and_packs_parts_that_unpack_to_a_loadable_model(tmp_path, monkeypatch):
    import io
    import json
    import tarfile

    from dalle_app.training.candidate import main as candidate

    monkeypatch.setenv("DALLE_APP_MODEL_DIRS", str(tmp_path))  # the evaluation loads the export from here
    folder = tmp_path / "run"
    candidate(["--recipe", "quick", "--minutes", "4", "--folder", str(folder), "--eval-n", "4", "--shard-mib", "0.05",
               "--reserve-minutes", "1", "--device", "cpu", "--set", "dalle_steps=150"])
    summary = json.loads((folder / "summary.json").read_text())
    # the step count was fitted in the loop (at step 120) to the budget, with the recipe's 150 as the ceiling
    assert summary["phase"] == "done" and summary["config"]["dalle_budget_minutes"] == 0
    assert summary["config"]["dalle_steps"] == 150 and summary["throughput"]["dalle"]["steps"] == 150
    assert set(summary["eval_default.json"]["accuracy"]) >= {"color", "shape"}
    assert "vae_upper_bound" in summary["eval_default.json"]
    assert (folder / "weights").is_dir() and any((folder / "weights").iterdir())  # the copy kept during training
    parts = sorted((folder / "pack").iterdir())
    assert len(parts) > 1 and all(p.stat().st_size <= 0.05 * 2 ** 20 for p in parts)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    unpacked = tmp_path / "unpacked"
    assert (unpacked / "model" / "model.safetensors").read_bytes() == (folder / "model" / "model.safetensors").read_bytes()
    assert json.loads((unpacked / "eval_rerank8.json").read_text())["settings"]["rerank"] == 8
    # evaluated at the exported model's recommended guidance, and at 1, 2 and 3 beside it
    from dalle_app.training.train import GUIDED_COND_SCALE, GUIDED_TEMPERATURE, GUIDED_TOP_K
    recommended = json.loads((folder / "model" / "config.json").read_text())["source"]["recommended_sampling"]
    assert recommended == {"cond_scale": GUIDED_COND_SCALE, "top_k": GUIDED_TOP_K, "temperature": GUIDED_TEMPERATURE}
    assert json.loads((unpacked / "eval_default.json").read_text())["settings"]["cond_scale"] == GUIDED_COND_SCALE
    assert [json.loads((unpacked / f"eval_g{g}.json").read_text())["settings"]["cond_scale"]
            for g in (1, 2, 3)] == [1.0, 2.0, 3.0]
    from dalle_app.manager import ModelManager
    assert ModelManager(device="cpu").load(str(unpacked / "model")).clip is not None

    # a lost machine: only the float16 copy came away; a new folder continues from it (here: nothing left to train)
    import shutil
    shutil.copytree(folder / "weights", tmp_path / "again" / "weights")
    candidate(["--recipe", "quick", "--minutes", "2", "--folder", str(tmp_path / "again"), "--eval-n", "2",
               "--reserve-minutes", "0.5", "--device", "cpu", "--resume-weights"])
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["phase"] == "done" and again["config"]["dalle_steps"] == 150
    assert "dalle" not in again["throughput"]  # no DALLE step was run again


def test_vae_sweep_picks_the_best_shape_bound_among_variants_that_keep_the_object_count():
    from dalle_app.training.vae_sweep import overrides_of, pick_best

    results = {
        "ghosts": {"psnr": 27.0, "bound": {"shape": 0.95, "both": 0.9, "count": 0.6}},  # best shapes, extra blobs
        "sharp": {"psnr": 28.0, "bound": {"shape": 0.85, "both": 0.7, "count": 0.97}},
        "soft": {"psnr": 29.0, "bound": {"shape": 0.75, "both": 0.6, "count": 0.99}},
        "crashed": {"returncode": 1},
    }
    assert pick_best(results) == "sharp"
    del results["sharp"], results["soft"]
    assert pick_best(results) == "ghosts"  # nothing keeps the count: fall back to the best PSNR
    assert pick_best({"crashed": {"returncode": 1}}) is None
    assert overrides_of({"vae_batch": 128, "vae": {"hidden_dim": 192}}) == ['vae_batch=128', 'vae={"hidden_dim": 192}']


def test_an_exported_model_seeds_a_dalle_phase_that_trains_it_further(tmp_path):
    from pathlib import Path

    from dalle_app.training.candidate import seed_from_model

    torch.manual_seed(3)
    source = Trainer(quick_config(), tmp_path / "source", torch.device("cpu"))
    with torch.no_grad():  # unlike a fresh Trainer's (seeded) initial weights
        for p in [*source.dalle.parameters(), *source.clip.parameters()]:
            p.add_(torch.randn_like(p))
    model = source.export(tmp_path / "model", dtype=torch.float32)
    with pytest.raises(ValueError, match="not below the recipe's"):
        seed_from_model(Path(model), tmp_path / "too_far", "quick", at_step=quick_config().dalle_steps)

    seed_from_model(Path(model), tmp_path / "run", "quick", at_step=40, overrides=["dalle_steps=120"])
    resumed = Trainer(quick_config(), tmp_path / "run" / "weights", torch.device("cpu"))
    assert (resumed.phase, resumed.step, resumed.cfg.dalle_steps) == ("dalle", 40, 120)
    assert resumed.clip_step == resumed.cfg.clip_steps  # CLIP is carried over, not trained again
    assert resumed._rewarm_from == 40  # fresh optimizers: the learning rate warms up again
    for name in ("dalle", "clip"):  # the networks themselves, as the float16 copy keeps parameters
        mine, theirs = getattr(resumed, name).state_dict(), getattr(source, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) or torch.equal(mine[k], theirs[k].half().to(mine[k].dtype))
                   for k in theirs)
