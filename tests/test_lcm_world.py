"""The lcm world on tiny random-weight diffusers models: exactness against the stock pipelines,
ROCM gradients, LoRA export/resume, LCM-LoRA fuse/stack, mixed precision, loading errors, prompts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from cmalign.chain import ChainNoise, run_chain, step_divergences
from cmalign.config import TrainConfig, with_changes
from cmalign.errors import UserError
from cmalign.prompts import bundled_prompts, read_prompt_file, split_prompts
from cmalign.rewards.registry import RewardContext, build_reward
from cmalign.training.build import build_world
from cmalign.worlds.lcm.lora import OUR_ADAPTER
from cmalign.worlds.lcm.unet import LCMWorld
from lcm_fixtures import (
    RESOLUTION, perturb_lora_b, save_tiny_pipeline, stock_pipeline, tiny_clip, tiny_components, tiny_world,
    write_random_lora,
)

PROMPTS = ["a red cat", "a dog on grass"]
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_lcm.py"


def rollout(world, num_steps: int, seed: int = 3, prompts=PROMPTS, **kwargs):
    noise = ChainNoise.draw(len(prompts), world.latent_shape, num_steps, torch.Generator().manual_seed(seed))
    return run_chain(world, world.encode_prompts(prompts), noise, world.timesteps(num_steps), **kwargs)


def stock_call(pipe, num_steps: int, guidance_scale: float, output_type: str, seed: int = 3, prompts=PROMPTS):
    return pipe(prompts, num_inference_steps=num_steps, guidance_scale=guidance_scale, height=RESOLUTION,
                width=RESOLUTION, generator=torch.Generator().manual_seed(seed), output_type=output_type).images


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| relative to max |b|: float32 rounding (LCMScheduler computes c_skip/c_out in float32,
    schedule.py in float64) is amplified by the random UNet to about 1e-7 of the latents' scale."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def lcm_config(**overrides) -> TrainConfig:
    return TrainConfig(world="lcm", **{"lcm.resolution": RESOLUTION}, lora_rank=4, lora_alpha=4.0, **overrides)


def test_chain_reproduces_stock_lcm_pipeline(tmp_path):
    world = tiny_world(tmp_path / "ours")  # with our zero-effect LoRA attached
    pipe = stock_pipeline(tiny_components(tmp_path / "stock"))  # same seeded weights, no adapter at all
    for num_steps in (1, 4):
        with torch.no_grad():
            traj = rollout(world, num_steps)
            images = world.decode(traj.x0).clamp(0, 1)
        latents = stock_call(pipe, num_steps, world.guidance_scale, "latent")
        assert max_rel_diff(traj.x0, latents) < 1e-6
        assert (images - stock_call(pipe, num_steps, world.guidance_scale, "pt")).abs().max() < 1e-5


def test_rocm_step_trains_only_lora_through_vae_and_every_unet_call(tmp_path, monkeypatch):
    world = tiny_world(tmp_path / "world")
    perturb_lora_b(world.network, OUR_ADAPTER, std=0.02)  # non-zero B, so A gets gradient and the KL is > 0
    clip_folder, _ = tiny_clip(tmp_path / "clip")
    reward = build_reward("clip_score", RewardContext(world=world, options={"clip_score": {"path": str(clip_folder)}}))
    trainable = dict((n, p) for n, p in world.network.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = [p for m in (world.vae, world.pipeline.text_encoder) for p in m.parameters()]
    assert not any(p.requires_grad for p in frozen)
    before = {n: p.detach().clone() for n, p in world.network.named_parameters()}
    num_steps, beta = 4, 0.5

    def loss_and_grads(checkpointing: bool):
        traj = rollout(world, num_steps, with_reference=True, grad_checkpointing=checkpointing)
        images = world.decode(traj.x0)
        images.retain_grad()
        loss = -reward(images, PROMPTS).mean() + beta * step_divergences(traj).sum(1).mean()
        world.network.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), images.grad, {n: p.grad.clone() for n, p in trainable.items()}

    checkpointed_loss, _, checkpointed_grads = loss_and_grads(True)

    unet_outputs = []  # every UNet call's output, to check that gradient reaches each one
    original = world.model_output

    def recorded(x, timestep, cond):
        out = original(x, timestep, cond)
        if out.requires_grad:
            out.retain_grad()
            unet_outputs.append((timestep, out))
        return out

    monkeypatch.setattr(world, "model_output", recorded)
    loss, image_grad, grads = loss_and_grads(False)
    monkeypatch.undo()

    assert torch.isfinite(image_grad).all() and image_grad.abs().sum() > 0
    reached = {t for t, out in unet_outputs if out.grad is not None and out.grad.abs().sum() > 0}
    assert reached == set(world.timesteps(num_steps))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert torch.allclose(checkpointed_loss, loss)
    assert all(torch.allclose(checkpointed_grads[n], g, rtol=1e-4, atol=1e-7) for n, g in grads.items())

    # A normalised step of length eps down the gradient must realise at least half of the first-order decrease
    # eps |g|. The loss carries float32 rounding noise of ~1e-4 (the random UNet amplifies it to the latents'
    # scale, and any change of the weights changes the rounding): eps = 0.2 puts the predicted decrease (~1e-3)
    # well above it, while the curvature of the divergence term still leaves ~80% of it (a 1e-3 step's
    # decrease is below the noise, so `new_loss < loss` there was a coin toss).
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    eps = 0.2
    with torch.no_grad():
        for name, param in trainable.items():
            param -= eps * grads[name] / norm
    after = {n: p.detach() for n, p in world.network.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    assert all(not torch.equal(before[n], after[n]) for n in trainable)
    with torch.no_grad():
        traj = rollout(world, num_steps, with_reference=True)
        new_loss = -reward(world.decode(traj.x0), PROMPTS).mean() + beta * step_divergences(traj).sum(1).mean()
    assert loss - new_loss > 0.5 * eps * norm, (float(loss - new_loss), float(eps * norm))


def test_exported_lora_loads_in_stock_pipeline_and_resumes(tmp_path):
    world = tiny_world(tmp_path / "ours", lora_rank=4, lora_alpha=8.0)  # alpha != r: the scale must travel
    perturb_lora_b(world.network, OUR_ADAPTER)
    world.save_adapter(tmp_path / "adapter")
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"pytorch_lora_weights.safetensors", "adapter_model.safetensors", "adapter_config.json"} <= names
    with torch.no_grad():
        ours = world.decode(rollout(world, 4).x0).clamp(0, 1)
        with world.reference_policy():
            reference = world.decode(rollout(world, 4).x0).clamp(0, 1)
    assert (ours - reference).abs().max() > 1e-3  # the adapter has a visible effect

    pipe = stock_pipeline(tiny_components(tmp_path / "stock"))
    pipe.load_lora_weights(tmp_path / "adapter")
    assert (ours - stock_call(pipe, 4, world.guidance_scale, "pt")).abs().max() < 1e-5

    resumed = tiny_world(tmp_path / "resumed", lora_rank=None)
    resumed.load_adapter(tmp_path / "adapter")
    assert all(".rocm." in n for n, p in resumed.network.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.allclose(resumed.decode(rollout(resumed, 4).x0).clamp(0, 1), ours, atol=1e-6)
    with pytest.raises(UserError, match="r=4"):
        tiny_world(tmp_path / "other", lora_rank=2).load_adapter(tmp_path / "adapter")
    with pytest.raises(UserError, match="no lcm adapter"):
        resumed.load_adapter(tmp_path)


def test_from_config_loads_a_local_pipeline_folder(tmp_path):
    cfg = lcm_config(**{"lcm.model": str(save_tiny_pipeline(tmp_path))}, **{"lcm.guidance_scale": 6.0})
    world = build_world(cfg, "cpu")
    assert isinstance(world, LCMWorld) and world.name == "lcm"
    assert world.alphas_cumprod.dtype == torch.float64
    assert torch.equal(world.alphas_cumprod.float(), world.scheduler.alphas_cumprod)
    assert world.prediction_type == "epsilon" and world.latent_shape == (4, 16, 16)
    assert world.timesteps(4) == [999, 759, 499, 259]  # LCMScheduler's grid in diffusers 0.42
    direct = tiny_world(tmp_path / "direct", guidance_scale=6.0, lora_rank=4, lora_alpha=4.0)
    with torch.no_grad():
        assert torch.allclose(rollout(world, 4).x0, rollout(direct, 4).x0, atol=1e-6)
    assert not build_world(cfg, "cpu", lora=False).has_adapter


def test_lcm_lora_fused_or_stacked_gives_one_model_and_one_reference(tmp_path):
    cfg = lcm_config(**{"lcm.model": str(save_tiny_pipeline(tmp_path))}, **{"lcm.lora": str(write_random_lora(tmp_path))})
    fused = build_world(cfg)
    stacked = build_world(with_changes(cfg, **{"lcm.lora_mode": "stack"}))
    plain = build_world(with_changes(cfg, **{"lcm.lora": None}))
    trainable = [n for n, p in stacked.network.named_parameters() if p.requires_grad]
    assert trainable and all(f".{OUR_ADAPTER}." in n for n in trainable)
    with torch.no_grad():
        x_fused, x_stacked, x_plain = (rollout(w, 2).x0 for w in (fused, stacked, plain))
        assert max_rel_diff(x_stacked, x_fused) < 1e-5
        assert (x_fused - x_plain).abs().max() > 1e-3  # the LCM-LoRA has an effect

        perturb_lora_b(fused.network, OUR_ADAPTER)
        fused.save_adapter(tmp_path / "adapter")
        stacked.load_adapter(tmp_path / "adapter")  # the same adapter of ours on both
        tuned_fused, tuned_stacked = rollout(fused, 2, with_reference=True), rollout(stacked, 2, with_reference=True)
        assert max_rel_diff(tuned_stacked.x0, tuned_fused.x0) < 1e-5
        assert (tuned_fused.x0 - x_fused).abs().max() > 1e-3
        # the reference is the base model: LCM-LoRA on, only our adapter off
        assert max_rel_diff(tuned_stacked.ref_means[0], tuned_fused.ref_means[0]) < 1e-5
        with stacked.reference_policy():
            assert max_rel_diff(rollout(stacked, 2).x0, x_fused) < 1e-5
        assert max_rel_diff(rollout(stacked, 2).x0, tuned_stacked.x0) < 1e-6  # restored after the context
    assert [n for n, p in stacked.network.named_parameters() if p.requires_grad] == trainable


def test_unet_without_guidance_input_uses_cfg_like_stable_diffusion(tmp_path):
    """SD-1.5 + LCM-LoRA has no guidance embedding; guidance is classifier-free, as in the stock
    StableDiffusionPipeline driven by an LCMScheduler."""
    no_w = {"time_cond_proj_dim": None}
    world = tiny_world(tmp_path / "ours", unet_overrides=no_w, guidance_scale=1.5)
    pipe = stock_pipeline(tiny_components(tmp_path / "stock", **no_w), cls=StableDiffusionPipeline)
    with torch.no_grad():
        traj = rollout(world, 4)
    assert max_rel_diff(traj.x0, stock_call(pipe, 4, 1.5, "latent")) < 1e-6


def test_bf16_weights_with_float32_lora_backpropagate(tmp_path):
    world = tiny_world(tmp_path, mixed_precision="bf16")
    assert world.network.conv_in.weight.dtype == torch.bfloat16 and world.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    lora = world.trainable_parameters()
    assert lora and all(p.dtype == torch.float32 for p in lora)
    traj = rollout(world, 2, with_reference=True)
    images = world.decode(traj.x0)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    (images.mean() + step_divergences(traj).sum()).backward()
    grads = [p.grad for p in lora if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_unreachable_hub_id_is_one_user_error_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        build_world(lcm_config(**{"lcm.model": "cmalign-tests/no-such-lcm"}))
    message = str(info.value)
    assert "cmalign-tests/no-such-lcm" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_prompt_sets_files_and_split(tmp_path):
    animals, varied = bundled_prompts("simple_animals"), bundled_prompts("varied")
    assert 40 <= len(animals) <= 50 and len(set(varied)) == len(varied) >= 200
    train, heldout = tiny_world(tmp_path, lora_rank=None, heldout_fraction=0.2).default_prompts()
    assert len(heldout) == round(0.2 * len(animals)) and not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(animals)
    assert split_prompts(animals, 0.2) == (train, heldout)  # deterministic

    good = tmp_path / "prompts.txt"
    good.write_text("# animals\na cat\n\n  a dog  \n", encoding="utf-8")
    assert read_prompt_file(good) == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n \n# only a comment\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    for name, fragment in (("missing.txt", "does not exist"), ("empty.txt", "no prompts"), ("latin1.txt", "not UTF-8")):
        with pytest.raises(UserError, match=fragment):
            read_prompt_file(tmp_path / name)


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_lcm", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = benchmark.main(["--tiny", "--ks", "2", "--batches", "1", "--repeats", "1", "--out", str(tmp_path / "t.md")])
    table = [line for line in out.read_text().splitlines() if line.startswith("| 2 | 1 |")]
    assert "card: CPU" in out.read_text() and len(table) == 4
    assert all(float(line.split("|")[5]) > 0 for line in table)
    # the SDXL-class path (two text encoders, VAE checkpointing), one setting
    out = benchmark.main(["--size", "tiny-sdxl", "--ks", "2", "--batches", "1", "--repeats", "1", "--grads", "full",
                          "--checkpointing", "unet+vae", "--out", str(tmp_path / "x.md")])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 2 | 1 | unet+vae | full |")]
    assert "tiny SDXL-class" in out.read_text() and len(rows) == 1 and float(rows[0].split("|")[5]) > 0
