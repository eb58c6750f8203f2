"""The distilled few-step families in the lcm world (issue 22) on tiny pipelines in their publishers' layouts:
SD-Turbo (Euler, trailing), SDXL-Turbo (Euler ancestral, trailing), SDXL base + SDXL-Lightning's bare UNet state
dict (Euler, trailing), SD-1.5 + a Hyper-SD LoRA (DDIM trailing), SANA-Sprint (SCM, embedded guidance). Each is
identified from its configs (and file names) before weights load, trains through the CLI, and `cmalign sample`
equals the stock diffusers pipeline with the exported LoRA loaded; deterministic chains are regularised with the
floor and refused by the policy-gradient methods in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler, EulerDiscreteScheduler, SanaSprintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
)
from safetensors.torch import load_file

from cmalign.chain import step_divergences
from cmalign.cli import main
from cmalign.config import TrainConfig, with_changes
from cmalign.worlds.lcm.config import LCMConfig
from cmalign.worlds.lcm.family import family_defaults, identify
from cmalign.worlds.lcm.lora import DIFFUSERS_LORA_FILE, OUR_ADAPTER
from lcm_fixtures import (
    BASE_UNET, RESOLUTION, perturb_lora_b, random_components, save_sana_sprint_pipeline,
    save_sdxl_base_and_lightning_unet, save_turbo_pipeline, stock_pipeline, tiny_clip, write_hyper_lora,
)

TINY = ["--lora-rank", "4", "--lora-alpha", "4", "--batch-size", "1", "--steps", "1", "--eval-every", "100",
        "--eval-size", "1", "--final-eval-size", "1", "--grid-every", "100", "--checkpoint-every", "100",
        "--report-to", "none", "--device", "cpu", "--threads", "1", "--mixed-precision", "no",
        "--lcm.resolution", str(RESOLUTION)]
PROMPTS = ["a red cat", "a dog"]


def save_sd15_base(folder):
    """A tiny SD-1.5 base folder as stable-diffusion-v1-5 ships it (PNDMScheduler, its config saying clip_sample false)."""
    from diffusers import PNDMScheduler

    components = random_components(folder / "build", "tiny", **BASE_UNET)
    components["scheduler"] = PNDMScheduler.from_config(components["scheduler"].config, skip_prk_steps=True,
                                                        steps_offset=1)
    stock_pipeline(components, cls=StableDiffusionPipeline).save_pretrained(folder / "base")
    config_path = folder / "base" / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "clip_sample": False}))
    return folder / "base"


def family_case(name, tmp_path):
    """(cli flags naming the model, the stock pipeline as its card builds it, its guidance, the chain's name)."""
    if name in ("sd-turbo", "sdxl-turbo"):
        model = save_turbo_pipeline(tmp_path, "sd" if name == "sd-turbo" else "sdxl")
        cls = StableDiffusionPipeline if name == "sd-turbo" else StableDiffusionXLPipeline
        pipe = cls.from_pretrained(model, **({"safety_checker": None} if name == "sd-turbo" else {}))
        return ["--lcm.model", str(model)], pipe, 0.0, "euler" if name == "sd-turbo" else "euler_ancestral"
    if name == "sdxl-lightning":
        base, unet_file = save_sdxl_base_and_lightning_unet(tmp_path)
        pipe = StableDiffusionXLPipeline.from_pretrained(base)
        pipe.unet.load_state_dict(load_file(unet_file))
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        return ["--lcm.model", str(base), "--lcm.unet", str(unet_file)], pipe, 0.0, "euler"
    if name == "hyper-sd15":
        base, lora = save_sd15_base(tmp_path), write_hyper_lora(tmp_path)
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
        pipe.load_lora_weights(lora, weight_name="Hyper-SD15-2steps-lora.safetensors", adapter_name="hyper")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        flags = ["--lcm.model", str(base), "--lcm.lora", str(lora),
                 "--lcm.lora-weight-name", "Hyper-SD15-2steps-lora.safetensors"]
        return flags, pipe, 0.0, "ddim_trailing"
    model = save_sana_sprint_pipeline(tmp_path)
    return ["--lcm.model", str(model)], SanaSprintPipeline.from_pretrained(model), 4.5, "scm"


@pytest.mark.parametrize("name", ["sd-turbo", "sdxl-turbo", "sdxl-lightning", "hyper-sd15", "sana-sprint"])
def test_cli_trains_each_family_and_samples_equal_the_stock_pipeline(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags, pipe, guidance, chain = family_case(name, tmp_path)
    clip, _ = tiny_clip(tmp_path / "clip")
    run = tmp_path / "run"
    num_steps = 2
    code = main(["train", "--world", "lcm", *flags, "--num-steps", str(num_steps), "--prompts", "a red cat",
                 "--eval-prompts", "a dog", "--reward-weights", "clip_score=1.0", "--reward-paths", f"clip_score={clip}",
                 "--lr", "0.05", "--output-dir", str(run), *TINY])
    assert code == 0
    saved = (run / "config.yaml").read_text()  # the family's defaults: its chain and guidance
    assert f"scheduler: {chain}" in saved and f"guidance_scale: {guidance}" in saved
    exported = load_file(run / "adapter" / DIFFUSERS_LORA_FILE)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in exported.items())  # training moved the adapter
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and all(np.isfinite(s["loss"]) for s in steps)

    assert main(["sample", "--run", str(run), "--prompts", *PROMPTS, "--num-per-prompt", "1", "--num-steps",
                 str(num_steps), "--seed", "0", "--out", str(tmp_path / "samples")]) == 0
    ours = torch.from_numpy(np.load(tmp_path / "samples" / "samples.npz")["images"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run / "adapter")
    kwargs = {"use_resolution_binning": False} if name == "sana-sprint" else {}
    with torch.no_grad():
        stock = pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance, height=RESOLUTION,
                     width=RESOLUTION, generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))],  # sample's seed + i
                     output_type="pt", **kwargs).images
    diff = float((ours - stock).abs().max())
    print(f"{name}: max |ours - stock| = {diff:.2e}")
    assert diff < 1e-5


def test_deterministic_steps_get_the_floor_and_policy_gradients_are_refused_in_one_line(tmp_path, capsys):
    from cmalign.training.build import build_world
    from test_lcm_world import rollout

    model = save_turbo_pipeline(tmp_path, "sd")
    cfg = with_changes(TrainConfig(world="lcm", lora_rank=4, lora_alpha=4.0, **{"lcm.model": str(model)}),
                       **{"lcm.resolution": RESOLUTION, "lcm.guidance_scale": 0.0, "lcm.scheduler": "euler"})
    world = build_world(cfg)
    assert world.transition.deterministic and not world.classifier_free
    perturb_lora_b(world.network, OUR_ADAPTER, std=0.02)
    traj = rollout(world, 3, with_reference=True)
    for k in range(2):  # a deterministic step: next state = mean, regularised with the floor of that state's noise
        assert torch.equal(traj.states[k + 1], traj.means[k])
        assert traj.sigmas[k] == world.transition.sigma_floor(traj.timesteps[k], traj.timesteps[k + 1]) > 0
    assert traj.sigmas[-1] == world.transition.final_sigma(traj.timesteps[-1])
    divs = step_divergences(traj)
    assert torch.isfinite(divs).all() and (divs > 0).all()

    clip, _ = tiny_clip(tmp_path / "clip")
    capsys.readouterr()
    code = main(["train", "--world", "lcm", "--lcm.model", str(model), "--method", "rlcm", "--reward-weights",
                 "clip_score=1.0", "--reward-paths", f"clip_score={clip}", "--output-dir", str(tmp_path / "run"), *TINY,
                 "--batch-size", "2", "--num-steps", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("cmalign: error: "), repr(err[:400])
    assert "rlcm needs the chain's step log-probabilities" in err and "deterministic" in err
    assert not (tmp_path / "run").exists()


def config_only(folder, pipeline, scheduler, spacing=None, **unet):
    """A folder with configs and no weights (what family.py reads)."""
    folder.mkdir(parents=True)
    index = {"_class_name": pipeline, "scheduler": ["diffusers", scheduler]}
    (folder / "model_index.json").write_text(json.dumps(index))
    configs = {"scheduler": {"_class_name": scheduler, **({"timestep_spacing": spacing} if spacing else {})},
               "vae": {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}}
    if pipeline == "SanaSprintPipeline":
        configs["transformer"] = {"_class_name": "SanaTransformer2DModel", "sample_size": 32}
        configs["vae"] = {"_class_name": "AutoencoderDC", "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024]}
    else:
        configs["unet"] = {"_class_name": "UNet2DConditionModel", "sample_size": 64, **unet}
    for name, config in configs.items():
        (folder / name).mkdir()
        (folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")).write_text(json.dumps(config))
    return str(folder)


def test_each_family_is_identified_from_configs_and_names_with_its_published_settings(tmp_path):
    xl = {"addition_embed_type": "text_time"}
    sd_turbo = config_only(tmp_path / "sd-turbo", "StableDiffusionPipeline", "EulerDiscreteScheduler", "trailing")
    sdxl_turbo = config_only(tmp_path / "sdxl-turbo", "StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler",
                             "trailing", **xl)
    sdxl = config_only(tmp_path / "sdxl", "StableDiffusionXLPipeline", "EulerDiscreteScheduler", "leading",
                       **dict(xl, sample_size=128))
    sd15 = config_only(tmp_path / "sd15", "StableDiffusionPipeline", "PNDMScheduler")
    sana = config_only(tmp_path / "sana", "SanaSprintPipeline", "SCMScheduler")
    keys = ("lcm.scheduler", "num_steps", "lcm.guidance_scale", "lcm.resolution")
    cases = {  # lcm section -> (family, kind, (scheduler, K, guidance, resolution))
        "sd-turbo": (dict(model=sd_turbo), ("sd", "turbo", ("euler", 1, 0.0, 512))),
        "sdxl-turbo": (dict(model=sdxl_turbo), ("sdxl", "turbo", ("euler_ancestral", 1, 0.0, 512))),
        "lightning-unet-file": (dict(model=sdxl, unet="/x/SDXL-Lightning/sdxl_lightning_8step_unet.safetensors"),
                                ("sdxl", "lightning-unet", ("euler", 8, 0.0, 1024))),
        "lightning-lora": (dict(model=sdxl, lora="ByteDance/SDXL-Lightning",
                                lora_weight_name="sdxl_lightning_2step_lora.safetensors"),
                           ("sdxl", "lightning-lora", ("euler", 2, 0.0, 1024))),
        "hyper-sd15": (dict(model=sd15, lora="ByteDance/Hyper-SD", lora_weight_name="Hyper-SD15-8steps-lora.safetensors"),
                       ("sd", "hyper-lora", ("ddim_trailing", 8, 0.0, 512))),
        "hyper-sdxl-1step": (dict(model=sdxl, lora="ByteDance/Hyper-SD",
                                  lora_weight_name="Hyper-SDXL-1step-lora.safetensors"),
                             ("sdxl", "hyper-lora", ("tcd", 1, 0.0, 1024))),
        "sana-sprint": (dict(model=sana), ("sana", "sana-sprint", ("scm", 2, 4.5, 1024))),
    }
    for name, (lcm, (family, kind, settings)) in cases.items():
        section = LCMConfig(**lcm)
        info = identify(section)
        defaults = family_defaults(section)
        assert (info.family, info.kind, tuple(defaults[k] for k in keys)) == (family, kind, settings), name
    assert family_defaults(LCMConfig(**cases["hyper-sdxl-1step"][0]))["lcm.tcd_gamma"] == 1.0
    assert identify(LCMConfig(model=sdxl)).kind is None  # SDXL base (leading Euler) alone: still refused as plain
