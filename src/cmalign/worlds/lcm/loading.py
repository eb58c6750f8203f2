"""Loading an lcm world's components from a diffusers folder or hub id (float32; the worlds cast them),
a UNet swapped in (a diffusers folder or a bare state dict such as SDXL-Lightning's), and putting an LCM-LoRA
(or TCD-, Hyper-SD-, Lightning-LoRA) on a UNet."""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    DiffusionPipeline, LatentConsistencyModelPipeline, PixArtAlphaPipeline, SanaSprintPipeline,
    StableDiffusionXLPipeline, UNet2DConditionModel,
)

from cmalign.errors import UserError
from cmalign.hub import hub_errors, offline, resolve_file
from cmalign.worlds.lcm.family import is_unet_file, model_family
from cmalign.worlds.lcm.lora import LCM_ADAPTER


def load_components(model: str, unet: str | None = None) -> dict:
    """unet, vae, text encoder(s), tokenizer(s) and the scheduler from a diffusers folder or hub id
    (float32; the world casts them and builds its chain's scheduler from this one's config). `unet`
    replaces the pipeline's UNet (e.g. latent-consistency/lcm-sdxl on SDXL base)."""
    family = model_family(model, unet)  # before any weights load
    extra = {}
    if unet:
        extra["unet"] = load_unet(model, unet)
    if family == "sd":
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with hub_errors(model, "diffusion model"):
        pipe = DiffusionPipeline.from_pretrained(model, local_files_only=offline(), **extra)
    names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2")
                                                                          if family == "sdxl" else ())
    missing = [n for n in names if getattr(pipe, n, None) is None]
    if missing:
        raise UserError(f"{model} is not a text-to-image latent diffusion pipeline (no {', '.join(missing)})")
    components = {n: getattr(pipe, n) for n in names}
    if family == "sdxl":
        components["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    return components


def load_unet(model: str, unet: str) -> UNet2DConditionModel:
    """A UNet given with --lcm.unet: a diffusers UNet folder or hub id, or a bare state dict (.safetensors, local or
    owner/repo/FILE, e.g. ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors) loaded into the pipeline's
    own UNet config, refused in one line unless every tensor fits."""
    if not is_unet_file(unet):
        with hub_errors(unet, "UNet"):
            return UNet2DConditionModel.from_pretrained(unet, local_files_only=offline())
    from safetensors.torch import load_file

    path = Path(unet).expanduser()
    if not path.is_file():  # owner/repo/path/in/repo.safetensors on the hub
        if unet.startswith(("/", ".", "~")) or unet.count("/") < 2:
            raise UserError(f"UNet state dict: no such file: {unet} (given with --lcm.unet)")
        owner, repo, name = unet.split("/", 2)
        path = resolve_file(f"{owner}/{repo}", name, "UNet state dict", "--lcm.unet")
    with hub_errors(model, "diffusion model"):
        config = UNet2DConditionModel.load_config(model, subfolder="unet", local_files_only=offline())
    network = UNet2DConditionModel.from_config(config)
    with hub_errors(str(path), "UNet state dict"):
        state = load_file(str(path))
    result = network.load_state_dict(state, strict=False)
    odd = list(result.missing_keys) + list(result.unexpected_keys)
    if odd:
        raise UserError(f"the UNet state dict {path} does not fit the UNet config of {model} ({len(result.missing_keys)} "
                        f"missing, {len(result.unexpected_keys)} unexpected tensors, e.g. {odd[0]})")
    return network


def load_sana_components(model: str) -> dict:
    """transformer, vae, text encoder, tokenizer and scheduler of a SanaSprintPipeline folder or hub id (float32; the
    world casts them). The Gemma tokenizer loads from tokenizer/tokenizer.json (tokenizer.model needs sentencepiece)."""
    with hub_errors(model, "diffusion model"):
        pipe = SanaSprintPipeline.from_pretrained(model, local_files_only=offline())
    names = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [n for n in names if getattr(pipe, n, None) is None]
    if missing:
        hint = (" (the Gemma tokenizer loads from tokenizer/tokenizer.json, or tokenizer/tokenizer.model with "
                "`pip install sentencepiece`)" if "tokenizer" in missing else "")
        raise UserError(f"{model} is not a complete SANA-Sprint pipeline (no {', '.join(missing)}){hint}")
    return {n: getattr(pipe, n) for n in names}


def load_pixart_components(model: str) -> dict:
    """transformer, vae, text encoder, tokenizer and scheduler of a PixArtAlphaPipeline folder or hub id
    (float32; the world casts them)."""
    with hub_errors(model, "diffusion model"):
        pipe = PixArtAlphaPipeline.from_pretrained(model, local_files_only=offline())
    names = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [n for n in names if getattr(pipe, n, None) is None]
    if missing:
        raise UserError(f"{model} is not a complete PixArt pipeline (no {', '.join(missing)})")
    return {n: getattr(pipe, n) for n in names}


def _pipeline_of(components: dict):
    modules = {k: v for k, v in components.items() if k != "force_zeros_for_empty_prompt"}
    if "text_encoder_2" in modules:
        return StableDiffusionXLPipeline(**modules, add_watermarker=False)
    return LatentConsistencyModelPipeline(**modules, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


def apply_lcm_lora(components: dict, lora: str, mode: str = "fuse", weight_name: str | None = None) -> str | None:
    """Put an LCM-LoRA (or TCD-, Hyper-SD-LoRA) on the UNet: fused into its weights (returns None) or kept
    as a separate frozen adapter for our LoRA to stack on (returns its adapter name)."""
    if mode not in ("fuse", "stack"):
        raise UserError(f"lcm_lora_mode must be fuse or stack, got {mode!r}")
    pipe = _pipeline_of(components)
    kwargs = {} if weight_name is None else {"weight_name": weight_name}
    with hub_errors(lora, "LCM-LoRA"):
        pipe.load_lora_weights(lora, adapter_name=LCM_ADAPTER, local_files_only=offline(), **kwargs)
    if mode == "stack":
        return LCM_ADAPTER
    pipe.fuse_lora()  # in float32, before any cast to bf16/fp16
    pipe.unload_lora_weights()
    return None
