"""Kohya-format LoRA export (worlds/lcm/kohya.py): for SD-1.5-class and SDXL-class tiny pipelines and several target sets, the kohya
file written from cmalign's diffusers export follows sd-scripts' key scheme, loads into the stock pipelines
through their own load_lora_weights with every LoRA layer landed, and gives the diffusers export's outputs."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from cmalign.errors import UserError
from cmalign.worlds.lcm.kohya import (
    KOHYA_KEY, check_kohya_loads, export_kohya, kohya_metadata, read_diffusers_lora, sgm_module_name, to_kohya,
    write_kohya,
)
from cmalign.worlds.lcm.lora import DIFFUSERS_LORA_FILE, OUR_ADAPTER
from cmalign.worlds.lcm.unet import LCMWorld
from lcm_fixtures import SDXL_UNET, RESOLUTION, perturb_lora_b, random_components, stock_pipeline, world_kwargs

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # cmalign's default targets
TARGET_SETS = {
    "attention": ATTENTION,
    # attention, transformer projections and feed-forward, resnets (incl. shortcut), down/upsampler convs
    "wide": ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                         "time_emb_proj", "conv"],
    "outer": ["conv_in", "conv_out", "linear_1", "linear_2"],  # time (and SDXL's added) embedding MLPs
}
# wide holds attention; sdxl-2: SDXL's own 2 layers per block (its SGM indices). The other combinations
# (sd-attention, sd-outer, sdxl-attention, sdxl-wide) passed on h-kohya and are left out to keep the suite fast.
CASES = [("sd", "wide"), ("sdxl", "outer"), ("sdxl-2", "wide")]
PROMPTS = ["a cat", "a red dog on grass"]


def components(folder, family: str) -> dict:
    if family == "sd":
        return random_components(folder, "tiny")
    return random_components(folder, "tiny-sdxl", **({"layers_per_block": 2} if family == "sdxl-2" else {}))


def pipeline(comps: dict):
    if "text_encoder_2" in comps:
        pipe = StableDiffusionXLPipeline(**comps, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return stock_pipeline(comps)  # LatentConsistencyModelPipeline


def lora_modules(model) -> dict[str, BaseTunerLayer]:
    return {n.removeprefix("text_model."): m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@torch.no_grad()
def unet_outputs(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    unet = pipe.unet
    config = unet.config
    sample = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    states = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    kwargs = {}
    if config.time_cond_proj_dim:
        kwargs["timestep_cond"] = torch.randn(2, config.time_cond_proj_dim, generator=generator)
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=generator),
                                       "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)}
    return unet(sample, torch.tensor([999, 499]), states, **kwargs).sample


@torch.no_grad()
def images(pipe) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=8.0, height=RESOLUTION, width=RESOLUTION,
                generator=torch.Generator().manual_seed(3), output_type="pt").images


def cmalign_export(tmp_path, family: str, targets: list[str]):
    """cmalign's own diffusers-format export of a random non-zero LoRA (rank 4, alpha 8: scale 2)."""
    world = LCMWorld(**components(tmp_path / "ours", family), **world_kwargs(lora_rank=4, lora_alpha=8.0,
                                                                              lora_targets=targets))
    perturb_lora_b(world.network, OUR_ADAPTER, std=0.05)
    world.save_adapter(tmp_path / "adapter")
    return world, tmp_path / "adapter" / DIFFUSERS_LORA_FILE


def assert_kohya_scheme(kohya: dict, family: str) -> None:
    assert all(KOHYA_KEY.match(k) for k in kohya), [k for k in kohya if not KOHYA_KEY.match(k)][:3]
    names = {k.partition(".")[0] for k in kohya}
    for name in names:  # down, up and a scalar alpha per module, nothing else
        assert {k for k in kohya if k.partition(".")[0] == name} == {f"{name}.lora_down.weight",
                                                                       f"{name}.lora_up.weight", f"{name}.alpha"}
        assert kohya[f"{name}.alpha"].ndim == 0 and kohya[f"{name}.alpha"].dtype == torch.float32
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    if family == "sd":  # sd-scripts trains SD-1.x on diffusers-named modules
        assert not any(re.search(r"input_blocks|middle_block|output_blocks", n) for n in unet_names)
    else:  # and SDXL on SGM-named ones
        assert not any(re.search(r"down_blocks|mid_block|up_blocks", n) for n in unet_names)


@pytest.mark.parametrize("family,targets", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_kohya_file_loads_completely_and_reproduces_the_diffusers_export(tmp_path, family, targets):
    world, diffusers_file = cmalign_export(tmp_path, family, TARGET_SETS[targets])
    ours = lora_modules(world.network)

    kohya_file = export_kohya(diffusers_file, tmp_path / "kohya" / "lora.safetensors",
                              pipeline(components(tmp_path / "shadow", family)))
    kohya = load_file(kohya_file)
    assert_kohya_scheme(kohya, family)
    assert len(kohya) == 3 * len(ours) > 0
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}  # rank 4, scale 2
    with safe_open(str(kohya_file), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert "lora_adapter_metadata" not in meta  # diffusers reads it through the kohya path, with the alphas

    base = pipeline(components(tmp_path / "base", family))
    from_diffusers = pipeline(components(tmp_path / "d", family))
    from_diffusers.load_lora_weights(diffusers_file.parent)
    from_kohya = pipeline(components(tmp_path / "k", family))
    from_kohya.load_lora_weights(kohya_file.parent, weight_name=kohya_file.name)

    # every LoRA layer landed, with our tensors and scale
    landed = lora_modules(from_kohya.unet)
    assert landed.keys() == ours.keys() == lora_modules(from_diffusers.unet).keys()
    for name, module in ours.items():
        other = landed[name]
        adapter = other.active_adapters[0]
        assert torch.equal(other.lora_A[adapter].weight, module.lora_A[OUR_ADAPTER].weight)
        assert torch.equal(other.lora_B[adapter].weight, module.lora_B[OUR_ADAPTER].weight)
        assert other.scaling[adapter] == module.scaling[OUR_ADAPTER] == 2.0

    reference = unet_outputs(from_diffusers)
    assert (reference - unet_outputs(base)).abs().max() > 1e-3  # the LoRA is visible ...
    assert (unet_outputs(from_kohya) - reference).abs().max() < 1e-5  # ... and the same through kohya's file
    assert (images(from_kohya) - images(from_diffusers)).abs().max() < 1e-5


def test_sdxl_names_are_sd_scripts_sgm_names():
    """stabilityai/stable-diffusion-xl-base-1.0's layout: the names kohya's SDXL LoRAs carry."""
    expected = {
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
        "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj": "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj",
        "mid_block.resnets.0.conv2": "middle_block.0.out_layers.3",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.conv1": "middle_block.2.in_layers.2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": "output_blocks.0.1.transformer_blocks.0.attn2.to_out.0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "conv_in": "input_blocks.0.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "add_embedding.linear_2": "label_emb.0.2",
    }
    assert {k: sgm_module_name(k, SDXL_UNET) for k in expected} == expected
    assert sgm_module_name("time_embedding.cond_proj", SDXL_UNET) is None
    assert sgm_module_name("down_blocks.1.attentions.0.norm", SDXL_UNET) == "input_blocks.4.1.norm"  # (not a LoRA target)


def random_text_encoder_lora(text_encoder, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """peft-keyed LoRA tensors on a CLIP text encoder's attention and MLP projections (sd-scripts' targets)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in text_encoder.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
            out[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            out[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    return out


def transformers_peft_ok() -> bool:
    """transformers' peft integration (text encoders' load_adapter, which diffusers' loader calls) may demand a
    newer peft than the installed one."""
    from transformers.integrations.peft import MIN_PEFT_VERSION
    from transformers.utils.peft_utils import check_peft_version

    try:
        check_peft_version(min_version=MIN_PEFT_VERSION)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_encoder_loras_map_too(tmp_path, family):
    """lora_te_ (SD-1.x) or lora_te1_ / lora_te2_ (SDXL) keys with text_model. in them, as sd-scripts writes
    (transformers 5 has no text_model level in CLIPTextModel), read back by the stock loader's conversions."""
    comps = components(tmp_path / "ours", family)
    config = LoraConfig(r=2, lora_alpha=3.0, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    layers, metadata = {}, {}
    for index, name in enumerate(n for n in ("text_encoder", "text_encoder_2") if n in comps):
        layers[f"{name}_lora_layers"] = random_text_encoder_lora(comps[name], seed=index)
        metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    unet_config = LoraConfig(r=4, lora_alpha=4.0, target_modules=ATTENTION)
    comps["unet"].add_adapter(unet_config, adapter_name="made")
    perturb_lora_b(comps["unet"], "made", std=0.05)
    layers["unet_lora_layers"] = get_peft_model_state_dict(comps["unet"], adapter_name="made")
    stock = pipeline(components(tmp_path / "s", family))
    type(stock).save_lora_weights(tmp_path / "diffusers", **layers, **metadata,
                                  unet_lora_adapter_metadata=unet_config.to_dict())
    diffusers_file = tmp_path / "diffusers" / DIFFUSERS_LORA_FILE

    state_dict, configs = read_diffusers_lora(diffusers_file)
    kohya = to_kohya(state_dict, unet_config=stock.unet.config, adapter_configs=configs)  # reads every key back
    assert_kohya_scheme(kohya, family)
    assert len(kohya) == 3 * len(state_dict) // 2
    prefixes = {k.split("_text_model_")[0] for k in kohya if not k.startswith("lora_unet_")}
    assert prefixes == ({"lora_te"} if family == "sd" else {"lora_te1", "lora_te2"})
    first = "lora_te" if family == "sd" else "lora_te1"
    assert f"{first}_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert f"{first}_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in kohya
    assert {float(v) for k, v in kohya.items() if k.startswith("lora_te") and k.endswith(".alpha")} == {3.0}

    if not transformers_peft_ok():
        pytest.skip("this transformers' peft integration refuses the installed peft: no text-encoder LoRA loads "
                    "into a stock pipeline here, from either format")
    kohya_file = export_kohya(diffusers_file, tmp_path / "k.safetensors", stock)
    from_diffusers = pipeline(components(tmp_path / "d", family))
    from_diffusers.load_lora_weights(diffusers_file.parent)
    from_kohya = pipeline(components(tmp_path / "k", family))
    from_kohya.load_lora_weights(kohya_file.parent, weight_name=kohya_file.name)
    for name in ("text_encoder", "text_encoder_2"):
        if name in comps:
            expected = {k.rsplit(".lora_", 1)[0].removeprefix("text_model.") for k in layers[f"{name}_lora_layers"]}
            assert lora_modules(getattr(from_kohya, name)).keys() == expected
    assert (images(from_kohya) - images(from_diffusers)).abs().max() < 1e-5


def test_an_unmappable_tensor_is_refused_in_one_line(tmp_path):
    """LCM's guidance-embedding input (time_embedding.cond_proj) has no sd-scripts module: nothing is written."""
    world, diffusers_file = cmalign_export(tmp_path, "sd", ATTENTION + ["cond_proj"])
    out = tmp_path / "kohya" / "lora.safetensors"
    with pytest.raises(UserError, match=r"unet\.time_embedding\.cond_proj\.lora_A\.weight .*diffusers .*peft") as info:
        export_kohya(diffusers_file, out, pipeline(components(tmp_path / "s", "sd")))
    assert "\n" not in str(info.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())

    state_dict, configs = read_diffusers_lora(diffusers_file)
    for bad, match in [("unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
                       ("unet.down_blocks.1.attentions.0.proj_in.lora_B.bias", "biases"),
                       ("unet.down_blocks.1.attentions.0.proj_in.lora.down.weight", "peft-keyed")]:
        mapped = {k: v for k, v in state_dict.items() if "cond_proj" not in k}
        with pytest.raises(UserError, match=re.escape(bad) + ".*" + match):
            to_kohya({**mapped, bad: torch.zeros(4)}, unet_config=world.network.config, adapter_configs=configs)


def test_a_file_that_would_load_partly_is_refused(tmp_path):
    """check_kohya_loads detects layers the stock loader drops (it only warns) or misplaces."""
    world, diffusers_file = cmalign_export(tmp_path, "sdxl", ATTENTION)
    state_dict, configs = read_diffusers_lora(diffusers_file)
    kohya = to_kohya(state_dict, unet_config=world.network.config, adapter_configs=configs)
    stock = pipeline(components(tmp_path / "s", "sdxl"))
    name = sorted(k for k in kohya if k.endswith(".alpha"))[0].partition(".")[0]

    dropped = {k: v for k, v in kohya.items() if not k.startswith(f"{name}.")}
    write_kohya(tmp_path / "dropped.safetensors", dropped, kohya_metadata(dropped, world.network.config))
    with pytest.raises(UserError, match=r"loads incompletely .*: \d+ of \d+ LoRA layers land as exported \(1 missing"):
        check_kohya_loads(tmp_path / "dropped.safetensors", stock, state_dict, configs)

    rescaled = dict(kohya, **{f"{name}.alpha": torch.tensor(4.0)})
    write_kohya(tmp_path / "rescaled.safetensors", rescaled)
    with pytest.raises(UserError, match=rf"does not hold the exported LoRA: 1 of \d+ modules .*e\.g\. {name}\.alpha"):
        check_kohya_loads(tmp_path / "rescaled.safetensors", stock, state_dict, configs)

    assert check_kohya_loads(write_kohya(tmp_path / "ok.safetensors", kohya), stock, state_dict, configs) == len(kohya) // 3


@pytest.mark.parametrize("pattern,loads", [({"conv1": 2.0}, True), ({"to_k": 4.0}, False)], ids=["conv1", "to_k"])
def test_per_module_alphas(tmp_path, pattern, loads):
    """Modules with their own scale (peft alpha_pattern) get their own kohya alpha. diffusers' kohya loader
    honours it for resnet convs but drops it for attention projections (its alpha_pattern keys keep the
    processor.to_k_lora spelling), so such a file would load with another scale there: refused."""
    config = LoraConfig(r=4, lora_alpha=8.0, alpha_pattern=pattern, target_modules=ATTENTION + ["conv1"])
    comps = components(tmp_path / "ours", "sd")
    comps["unet"].add_adapter(config, adapter_name="made")
    perturb_lora_b(comps["unet"], "made", std=0.05)
    stock = pipeline(components(tmp_path / "s", "sd"))
    type(stock).save_lora_weights(tmp_path / "d", unet_lora_layers=get_peft_model_state_dict(comps["unet"], adapter_name="made"),
                                  unet_lora_adapter_metadata=config.to_dict())
    state_dict, configs = read_diffusers_lora(tmp_path / "d" / DIFFUSERS_LORA_FILE)
    kohya = to_kohya(state_dict, unet_config=stock.unet.config, adapter_configs=configs)
    key, alpha = next(iter(pattern.items()))
    assert {float(v) for k, v in kohya.items() if k.endswith(f"_{key}.alpha")} == {alpha}
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha") and f"_{key}." not in k} == {8.0}
    out = tmp_path / "k.safetensors"
    if loads:
        export_kohya(tmp_path / "d" / DIFFUSERS_LORA_FILE, out, stock)
        from_kohya = pipeline(components(tmp_path / "k", "sd"))
        from_kohya.load_lora_weights(out.parent, weight_name=out.name)
        scales = {n: m.scaling[m.active_adapters[0]] for n, m in lora_modules(from_kohya.unet).items()}
        assert {s for n, s in scales.items() if n.endswith(key)} == {alpha / 4} and set(scales.values()) == {2.0, 0.5}
    else:
        with pytest.raises(UserError, match=r"loads incompletely .*with other values or scale"):
            export_kohya(tmp_path / "d" / DIFFUSERS_LORA_FILE, out, stock)
        assert not out.exists()
