"""The lcm world's model and chain families (issue 12) on tiny random pipelines saved with
save_pretrained: SDXL-class (LCM-SDXL's guidance embedding; SDXL base + LCM-LoRA with CFG), TCD on
SD-1.5 and SDXL, each equal to its stock diffusers pipeline; family detection before weights load;
adapter export into the stock SDXL pipeline; VAE-decoder checkpointing; the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, TCDScheduler,
    UNet2DConditionModel,
)
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file

from cmalign.chain import step_divergences
from cmalign.cli import main
from cmalign.config import TrainConfig, validate
from cmalign.errors import UserError
from cmalign.training.build import build_world
from cmalign.worlds.lcm.family import model_family
from cmalign.worlds.lcm.lora import DIFFUSERS_LORA_FILE, OUR_ADAPTER
from cmalign.worlds.lcm.unet import LCMWorld
from lcm_fixtures import TINY_VAE, RESOLUTION, perturb_lora_b, random_components, stock_pipeline, tiny_clip, world_kwargs
from test_lcm_export import lora_param_count
from test_lcm_world import PROMPTS, rollout

NO_W = {"time_cond_proj_dim": None}  # a base UNet (SDXL base + LCM-LoRA): classifier-free guidance


def sdxl_components(folder, **unet_overrides):
    return random_components(folder, "tiny-sdxl", **unet_overrides)


def sdxl_stock(components, scheduler: str = "lcm"):
    if scheduler == "tcd":
        components = dict(components, scheduler=TCDScheduler.from_config(components["scheduler"].config))
    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sdxl_pipeline(folder, **unet_overrides):
    sdxl_stock(sdxl_components(folder / "build", **unet_overrides)).save_pretrained(folder / "model")
    return folder / "model"


def cfg_for(model, **lcm) -> TrainConfig:
    return TrainConfig(world="lcm", lora_rank=4, lora_alpha=4.0, **{"lcm.model": str(model)}, **{"lcm.resolution": RESOLUTION},
                       **{"lcm.guidance_scale": lcm.pop("lcm.guidance_scale", 8.0)}, **lcm)


def stock_call(pipe, num_steps, guidance, output_type, seed=3, **kwargs):
    return pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance, height=RESOLUTION, width=RESOLUTION,
                generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs).images


def assert_equal_to_stock(world, pipe, num_steps, guidance, eta=None):
    kwargs = {} if eta is None else {"eta": eta}
    with torch.no_grad():
        traj = rollout(world, num_steps)
        images = world.decode(traj.x0).clamp(0, 1)
    latents = stock_call(pipe, num_steps, guidance, "latent", **kwargs)
    # latents reach |x| ~ 60 with random weights: float32 rounding, relative 1e-6
    assert float((traj.x0 - latents).abs().max() / latents.abs().max()) < 1e-6
    assert (images - stock_call(pipe, num_steps, guidance, "pt", **kwargs)).abs().max() < 1e-5
    return traj


# SSD-1B: the SDXL pipeline with a pruned UNet, whose up blocks have their own transformer depths
SSD_1B_LIKE = {"reverse_transformer_layers_per_block": ((1, 3), (1, 1))}


@pytest.mark.parametrize("unet, guidance", [({}, 8.0), (NO_W, 1.5), (SSD_1B_LIKE, 8.0)],
                         ids=["lcm-sdxl", "sdxl-base-cfg", "lcm-ssd-1b-like"])
def test_sdxl_chain_from_a_saved_folder_equals_the_stock_sdxl_pipeline(tmp_path, unet, guidance):
    model = save_sdxl_pipeline(tmp_path, **unet)
    assert model_family(str(model)) == "sdxl"
    world = build_world(cfg_for(model, **{"lcm.guidance_scale": guidance}))
    assert world.family == "sdxl" and world.classifier_free == (unet is NO_W)
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    for num_steps in (1, 4) if not unet else (4,):
        assert_equal_to_stock(world, pipe, num_steps, guidance)


@pytest.mark.parametrize("family, gamma", [("sd", 0.0), ("sd", 0.3), ("sdxl", 1.0)])
def test_tcd_chain_equals_the_stock_pipeline_with_tcd_scheduler(tmp_path, family, gamma):
    size = "tiny" if family == "sd" else "tiny-sdxl"
    world = LCMWorld(**random_components(tmp_path / "a", size, **NO_W),
                     **world_kwargs(guidance_scale=1.5, lora_rank=4, chain_scheduler="tcd", tcd_gamma=gamma))
    stock = random_components(tmp_path / "b", size, **NO_W)
    if family == "sd":
        stock["scheduler"] = TCDScheduler.from_config(stock["scheduler"].config)
        pipe = stock_pipeline(stock, cls=StableDiffusionPipeline)
    else:
        pipe = sdxl_stock(stock, "tcd")
    traj = assert_equal_to_stock(world, pipe, 4, 1.5, eta=gamma)
    # the per-step policy: TCD's re-noising sigma, or at gamma = 0 (deterministic) the floor 1 - abar_{t'}
    abar, ts = world.alphas_cumprod, traj.timesteps
    for k in range(3):
        s = int((1 - gamma) * ts[k + 1])
        expected = (1 - abar[ts[k + 1]] / abar[s]) ** 0.5 if gamma > 0 else (1 - abar[ts[k + 1]]) ** 0.5
        assert traj.sigmas[k] == pytest.approx(float(expected), rel=1e-9) and traj.sigmas[k] > 0
    if gamma == 0.0:  # a deterministic chain: the next state is the mean itself
        assert torch.equal(traj.states[1], traj.means[0])
        perturb_lora_b(world.network, OUR_ADAPTER, std=0.02)
        divs = step_divergences(rollout(world, 4, with_reference=True))
        assert torch.isfinite(divs).all() and (divs > 0).all()


def test_sdxl_lora_export_lands_in_the_stock_sdxl_pipeline_and_lcm_lora_fuses_or_stacks(tmp_path):
    model = save_sdxl_pipeline(tmp_path, **NO_W)
    # an LCM-LoRA stand-in for the tiny SDXL UNet, in diffusers' SDXL LoRA file
    made = sdxl_components(tmp_path / "made", **NO_W)["unet"]
    made.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "made")
    perturb_lora_b(made, "made", seed=9)
    # a repository of several LoRA files (as ByteDance/Hyper-SD): the one to use is named
    lora_layers = get_peft_model_state_dict(made, adapter_name="made")
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lcm_lora", unet_lora_layers=lora_layers,
                                                weight_name="Hyper-like-2steps-lora.safetensors")
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lcm_lora", weight_name="other-lora.safetensors",
                                                unet_lora_layers={k: v * 0 for k, v in lora_layers.items()})
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "ff.net.2"]
    cfg = cfg_for(model, **{"lcm.guidance_scale": 1.0}, **{"lcm.lora": str(tmp_path / "lcm_lora")}, **{"lcm.lora_targets": targets},
                  **{"lcm.lora_weight_name": "Hyper-like-2steps-lora.safetensors"})
    fused = build_world(cfg)
    stacked = build_world(_stacked(cfg))
    perturb_lora_b(fused.network, OUR_ADAPTER, std=0.05)
    fused.save_adapter(tmp_path / "adapter")
    stacked.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        x_fused, x_stacked = rollout(fused, 2).x0, rollout(stacked, 2).x0
    assert float((x_fused - x_stacked).abs().max() / x_fused.abs().max()) < 1e-5
    # the named LoRA (not the zero one beside it) was fused into the base weights
    base = UNet2DConditionModel.from_pretrained(model / "unet").state_dict()
    name = next(k for k in base if k.endswith("attn1.to_q.weight"))
    fused_q = dict(fused.network.named_parameters())[name.replace("to_q.weight", "to_q.base_layer.weight")]
    assert (fused_q - base[name]).abs().max() > 1e-4

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lcm_lora", adapter_name="lcm", weight_name="Hyper-like-2steps-lora.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(tmp_path / "adapter")
    assert lora_param_count(pipe.unet) == lora_param_count(fused.network) > 0  # every tensor landed
    with torch.no_grad():
        ours = fused.decode(rollout(fused, 2).x0).clamp(0, 1)
    assert (ours - stock_call(pipe, 2, 1.0, "pt")).abs().max() < 1e-5


def _stacked(cfg):
    import dataclasses

    return dataclasses.replace(cfg, lcm=dataclasses.replace(cfg.lcm, lora_mode="stack"))


def test_family_comes_from_model_index_and_unsupported_ones_are_refused_before_weights(tmp_path, monkeypatch):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="FluxPipeline pipeline; the lcm world runs"):
        build_world(cfg_for(flux))  # no weights exist there: refused before any load
    unet_only = tmp_path / "lcm-sdxl"
    unet_only.mkdir()
    (unet_only / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="--lcm.unet"):
        build_world(cfg_for(unet_only))
    # the same for a hub id (here a stand-in: no model_index.json, a UNet config.json)
    def no_index(*args, **kwargs):
        raise OSError("model_index.json not found")

    with monkeypatch.context() as patch:
        patch.setattr(DiffusionPipeline, "load_config", no_index)
        patch.setattr(UNet2DConditionModel, "load_config", lambda *a, **k: {"_class_name": "UNet2DConditionModel"})
        with pytest.raises(UserError, match="is a UNet, not a diffusers pipeline; give it with --lcm.unet"):
            model_family("latent-consistency/lcm-sdxl")
    # an SD-1.5-class pipeline given an SDXL-class UNet (--lcm.unet) is refused from the configs alone
    sd = tmp_path / "sd"
    stock_pipeline(random_components(tmp_path / "sdb", "tiny")).save_pretrained(sd)
    sdxl_unet = tmp_path / "sdxl_unet"
    sdxl_components(tmp_path / "u")["unet"].save_pretrained(sdxl_unet)
    assert model_family(str(sd)) == "sd"
    with pytest.raises(UserError, match="SDXL-class UNet .* sd family"):
        model_family(str(sd), unet=str(sdxl_unet))
    with pytest.raises(UserError, match="tcd_gamma must be in"):
        validate(cfg_for(sd, **{"lcm.tcd_gamma": 1.5}), check_rewards=False)


def test_a_deterministic_chain_is_refused_by_the_methods_that_need_a_stochastic_one():
    """The world reports its chain (TCD gamma 0: deterministic); the methods and the reward check refuse it."""
    tcd0 = {"world": "lcm", "lcm.scheduler": "tcd", "lcm.tcd_gamma": 0.0, "reward_weights": {"pickscore": 1.0}}
    for method in ("rlcm", "dpok", "d3po"):
        with pytest.raises(UserError, match=f"{method} needs the chain's step log-probabilities.*TCD with tcd_gamma 0"):
            validate(TrainConfig(method=method, **tcd0))
    with pytest.raises(UserError, match=r"jpeg_compressibility \(not differentiable\).*deterministic"):  # rocm's estimator
        validate(TrainConfig(**dict(tcd0, reward_weights={"pickscore": 1.0, "jpeg_compressibility": 0.1})))
    validate(TrainConfig(**tcd0))
    validate(TrainConfig(method="draft", beta=0.0, **tcd0))
    validate(TrainConfig(method="rlcm", **dict(tcd0, **{"lcm.tcd_gamma": 0.3})))


def test_vae_decoder_checkpointing_leaves_gradients_unchanged():
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).double()
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    weight = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def grad(checkpointing: bool):
        vae.disable_gradient_checkpointing() if not checkpointing else vae.enable_gradient_checkpointing()
        x = x0.clone().requires_grad_(True)
        vae.zero_grad()
        (vae.decode(x).sample * weight).sum().backward()
        return x.grad, [p.grad.clone() for p in vae.decoder.parameters()]

    plain, checkpointed = grad(False), grad(True)
    assert vae.decoder.gradient_checkpointing
    assert torch.allclose(plain[0], checkpointed[0], rtol=1e-12, atol=1e-14) and plain[0].abs().sum() > 0
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(plain[1], checkpointed[1]))


@pytest.mark.parametrize("family, scheduler", [("sdxl", "lcm"), ("sd", "tcd")])
def test_cli_trains_on_a_tiny_folder_and_samples_equal_the_stock_pipeline(tmp_path, monkeypatch, family, scheduler):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if family == "sdxl":  # LCM-SDXL: the guidance embedding, no CFG
        model, cls, guidance = save_sdxl_pipeline(tmp_path), StableDiffusionXLPipeline, 8.0
    else:  # an SD-1.5 base (+ a TCD-LoRA, here fused away): CFG, TCDScheduler
        model, cls, guidance = tmp_path / "model", StableDiffusionPipeline, 1.5
        stock_pipeline(random_components(tmp_path / "build", "tiny", **NO_W), cls=cls).save_pretrained(model)
    clip, _ = tiny_clip(tmp_path / "clip")
    run = tmp_path / "run"
    tiny = ["--lora-rank", "4", "--lora-alpha", "4", "--num-steps", "2", "--batch-size", "1", "--steps", "2",
            "--eval-every", "100", "--eval-size", "1", "--final-eval-size", "1", "--grid-every", "100",
            "--checkpoint-every", "100", "--report-to", "none", "--device", "cpu", "--threads", "1", "--mixed-precision", "no"]
    code = main(["train", "--world", "lcm", "--lcm.model", str(model), "--lcm.resolution", str(RESOLUTION),
                 "--lcm.guidance-scale", str(guidance), "--lcm.scheduler", scheduler, "--lcm.tcd-gamma", "0.3",
                 "--lcm.vae-checkpointing", "--prompts", "a red cat", "--eval-prompts", "a dog",
                 "--reward-weights", "clip_score=1.0", "--reward-paths", f"clip_score={clip}", "--beta", "0.1",
                 "--lr", "0.05", "--output-dir", str(run), *tiny])
    assert code == 0
    saved = (run / "config.yaml").read_text()
    assert "vae_checkpointing: true" in saved and f"scheduler: {scheduler}" in saved
    exported = load_file(run / "adapter" / DIFFUSERS_LORA_FILE)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in exported.items())  # training moved the adapter
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)

    assert main(["sample", "--run", str(run), "--prompts", "a red cat", "a dog", "--num-per-prompt", "1",
                 "--seed", "5", "--out", str(tmp_path / "samples")]) == 0
    ours = torch.from_numpy(np.load(tmp_path / "samples" / "samples.npz")["images"])
    pipe = cls.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {}
    if scheduler == "tcd":
        pipe.scheduler, kwargs = TCDScheduler.from_config(pipe.scheduler.config), {"eta": 0.3}
    pipe.load_lora_weights(run / "adapter")
    with torch.no_grad():
        stock = pipe(["a red cat", "a dog"], num_inference_steps=2, guidance_scale=guidance, height=RESOLUTION,
                     width=RESOLUTION, generator=[torch.Generator().manual_seed(5 + i) for i in range(2)], output_type="pt", **kwargs).images
    assert (ours - stock).abs().max() < 1e-5


def test_lcm_presets_say_what_they_run():
    from cmalign.config import available_presets, load_preset, validate

    expected = {  # name: (family's base, unet, lora, scheduler, K, guidance, resolution)
        "lcm-dreamshaper-v7": ("SimianLuo/LCM_Dreamshaper_v7", None, None, "lcm", 4, 8.0, 512),
        "sd15-lcm-lora": ("stable-diffusion-v1-5/stable-diffusion-v1-5", None, "latent-consistency/lcm-lora-sdv1-5",
                          "lcm", 4, 1.0, 512),
        "lcm-sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "latent-consistency/lcm-sdxl", None, "lcm", 4, 8.0, 1024),
        "sdxl-lcm-lora": ("stabilityai/stable-diffusion-xl-base-1.0", None, "latent-consistency/lcm-lora-sdxl", "lcm", 4,
                          1.0, 1024),
        "lcm-ssd-1b": ("segmind/SSD-1B", "latent-consistency/lcm-ssd-1b", None, "lcm", 4, 8.0, 1024),
        "ssd-1b-lcm-lora": ("segmind/SSD-1B", None, "latent-consistency/lcm-lora-ssd-1b", "lcm", 4, 1.0, 1024),
        "sdxl-tcd-lora": ("stabilityai/stable-diffusion-xl-base-1.0", None, "h1t/TCD-SDXL-LoRA", "tcd", 4, 0.0, 1024),
    }
    assert set(expected) <= set(available_presets())
    for name, want in expected.items():
        cfg = validate(load_preset(name), check_rewards=False)
        lcm = cfg.lcm
        assert cfg.world == "lcm" and (lcm.model, lcm.unet, lcm.lora, lcm.scheduler, cfg.num_steps, lcm.guidance_scale,
                                        lcm.resolution) == want, name
        assert lcm.vae_checkpointing == (lcm.resolution == 1024)


def test_every_command_of_docs_models_parses():
    import re
    import shlex
    from pathlib import Path

    from cmalign.cli import train_arguments

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    commands = [c.replace("\\\n", " ") for c in re.findall(r"cmalign train [^`\n\\]*(?:\\\n[^`\n\\]*)*", text)]
    assert len(commands) >= 9
    for command in commands:
        cfg = train_arguments(shlex.split(command)[2:])[0]
        assert cfg.world == "lcm", command
    hyper = next(c for c in commands if "Hyper-SD" in c)
    cfg = train_arguments(shlex.split(hyper)[2:])[0]
    assert (cfg.lcm.lora_weight_name, cfg.lcm.tcd_gamma, cfg.num_steps, cfg.lcm.scheduler) == (
        "Hyper-SDXL-1step-lora.safetensors", 1.0, 1, "tcd")


# --- the model's family and kind from its configs, refusal of plain bases, per-family defaults -----------------
def config_only_pipeline(folder, pipeline="StableDiffusionPipeline", scheduler="PNDMScheduler", **unet):
    """A pipeline folder with configs and no weights: what family.py reads (anything more would fail to load)."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "scheduler": ["diffusers", scheduler],
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    for name, config in (("unet", {"_class_name": "UNet2DConditionModel", "sample_size": 64, **unet}),
                         ("vae", {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]})):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder


def test_identify_reads_family_and_distillation_from_configs(tmp_path):
    from cmalign.worlds.lcm.config import LCMConfig
    from cmalign.worlds.lcm.family import identify

    sdxl = {"addition_embed_type": "text_time", "sample_size": 128}
    cases = {  # folder settings, lora -> (family, kind, native resolution)
        "dreamshaper": (dict(pipeline="LatentConsistencyModelPipeline", scheduler="LCMScheduler", time_cond_proj_dim=256),
                        None, ("sd", "lcm-unet", 512)),
        "sd15": ({}, None, ("sd", None, 512)),
        "sd15+lcm-lora": ({}, "latent-consistency/lcm-lora-sdv1-5", ("sd", "lcm-lora", 512)),
        "sd15+tcd-lora": ({}, "h1t/TCD-SD15-LoRA", ("sd", "tcd-lora", 512)),
        "fused-lcm-lora": (dict(scheduler="LCMScheduler"), None, ("sd", "lcm-lora", 512)),
        "fused-tcd-lora": (dict(scheduler="TCDScheduler"), None, ("sd", "tcd-lora", 512)),
        "sdxl": (dict(pipeline="StableDiffusionXLPipeline", scheduler="EulerDiscreteScheduler", **sdxl), None,
                 ("sdxl", None, 1024)),
        "lcm-sdxl": (dict(pipeline="StableDiffusionXLPipeline", time_cond_proj_dim=256, **sdxl), None,
                     ("sdxl", "lcm-unet", 1024)),
    }
    for name, (folder, lora, want) in cases.items():
        info = identify(LCMConfig(model=str(config_only_pipeline(tmp_path / name, **folder)), lora=lora))
        assert (info.family, info.kind, info.native_resolution) == want, name
        assert (info.distilled_by is None) == (info.kind is None), name


def test_a_plain_base_is_refused_in_one_line_before_any_weights_load(tmp_path, capsys):
    """SD-1.5 without an LCM UNet, LCM-LoRA or LCM scheduler: exit 2, one `cmalign: error:` line naming what to add
    (the folder holds no weights at all: the refusal comes from its configs)."""
    plain = config_only_pipeline(tmp_path / "sd15")
    clip, _ = tiny_clip(tmp_path / "clip")
    base = ["train", "--world", "lcm", "--lcm.model", str(plain), "--reward-weights", "clip_score=1.0", "--reward-paths",
            f"clip_score={clip}", "--report-to", "none", "--device", "cpu", "--output-dir", str(tmp_path / "run")]
    for extra in ([], ["--lcm.lora", "none"]):  # `none` clears the LoRA (and is not a LoRA named "none")
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("cmalign: error: ") and "Traceback" not in err, err
        assert "plain SD-1.5-class model" in err and "--lcm.lora latent-consistency/lcm-lora-sdv1-5" in err
        assert "--preset sd15-lcm-lora" in err and "--lcm.allow-non-distilled" in err
        assert not (tmp_path / "run").exists()
    # with the override (research on purpose) it goes on to load weights, which this folder lacks
    from cmalign.config import with_changes

    with pytest.raises(UserError) as info:
        build_world(with_changes(cfg_for(plain), **{"lcm.allow_non_distilled": True}))
    assert "is a plain" not in str(info.value)


def test_none_clears_an_optional_path_from_flags_yaml_and_python():
    from cmalign.cli import train_arguments
    from cmalign.config import from_mapping

    cfg = train_arguments(["--world", "lcm", "--lcm.lora", "none", "--lcm.unet", "null", "--lcm.lora-weight-name", "None"])[0]
    assert (cfg.lcm.lora, cfg.lcm.unet, cfg.lcm.lora_weight_name) == (None, None, None)
    for value in (None, "none", "NULL"):
        assert from_mapping({"lcm": {"lora": value}}, TrainConfig(**{"lcm.lora": "x/y"})).lcm.lora is None
    assert TrainConfig(**{"lcm.lora": "none"}).lcm.lora is None and TrainConfig(**{"lcm.lora": "x/none"}).lcm.lora == "x/none"


def test_family_defaults_are_one_table_for_the_world_hook_and_the_presets(tmp_path):
    from cmalign.config import load_preset, with_changes
    from cmalign.worlds.lcm.config import LCMConfig
    from cmalign.worlds.lcm.family import COMMON, family_defaults
    from cmalign.worlds.registry import world_class

    plain = str(config_only_pipeline(tmp_path / "sd15"))
    lora = family_defaults(LCMConfig(model=plain, lora="latent-consistency/lcm-lora-sdv1-5"))
    # an LCM-LoRA runs without CFG (guidance 1), bf16, small batches and evaluations: never the digits world's
    assert lora == {**COMMON, "batch_size": 4, "lcm.resolution": 512, "lcm.vae_checkpointing": False,
                    "lcm.guidance_scale": 1.0, "lcm.scheduler": "lcm"}
    assert lora["mixed_precision"] == "bf16" and lora["beta"] == 0.1 and lora["eval_size"] < 200
    tcd = family_defaults(LCMConfig(model=str(config_only_pipeline(
        tmp_path / "sdxl", pipeline="StableDiffusionXLPipeline", addition_embed_type="text_time", sample_size=128)),
        lora="h1t/TCD-SDXL-LoRA"))
    assert {k: tcd[k] for k in ("lcm.scheduler", "lcm.tcd_gamma", "lcm.guidance_scale", "lcm.resolution",
                                "lcm.vae_checkpointing", "batch_size")} == {
        "lcm.scheduler": "tcd", "lcm.tcd_gamma": 0.3, "lcm.guidance_scale": 0.0, "lcm.resolution": 1024,
        "lcm.vae_checkpointing": True, "batch_size": 2}
    assert family_defaults(LCMConfig(model="cmalign-tests/unknown")) == COMMON  # unreadable, unknown: common only
    cfg = TrainConfig(world="lcm", **{"lcm.model": plain, "lcm.lora": "latent-consistency/lcm-lora-sdv1-5"})
    hook = world_class("lcm").default_settings(cfg)
    assert hook == lora
    validate(with_changes(cfg, **hook), check_rewards=False)  # every key is a field, every value valid
    # the presets hold the table's values for their models (resolved offline from the known hub ids)
    for name in ("lcm-dreamshaper-v7", "sd15-lcm-lora", "lcm-sdxl", "sdxl-lcm-lora", "lcm-ssd-1b", "ssd-1b-lcm-lora",
                 "sdxl-tcd-lora", "pixart-lcm-xl-2-1024"):
        preset = load_preset(name)
        defaults = family_defaults(preset.lcm)
        assert set(defaults) > set(COMMON), name
        for key, value in defaults.items():
            section, _, field = key.rpartition(".")
            got = getattr(getattr(preset, section) if section else preset, field)
            assert got == value, (name, key, got, value)
