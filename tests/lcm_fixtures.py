"""Tiny random-weight models for the lcm world and its rewards, built offline in seconds; and random-weight
latent-consistency components of real sizes (SD-1.5: LCM-Dreamshaper-v7's configs; SDXL: stable-diffusion-xl-
base-1.0 with lcm-sdxl's guidance input) for the GPU benchmark (benchmarks/gpu_lcm.py imports them from here).

Nothing here downloads: the tokenizer is a byte-level CLIP BPE with no merges (every byte is a token),
which exercises the real CLIPTokenizer code path without the 49k-token vocabulary.

The reward checkpoints are written in their publishers' own formats (open_clip names for HPSv2,
improved-aesthetic-predictor names, BLIP/ImageReward names) by code that states those layouts
independently of the loaders' mappings, so the tests check the mappings rather than echo them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from transformers import (
    BlipTextConfig, BlipVisionConfig, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from cmalign.worlds.lcm.config import LCMConfig
from cmalign.worlds.lcm.lora import adapter_spec
from cmalign.worlds.lcm.unet import LCMWorld

RESOLUTION = 32  # pixels; 16 x 16 latents with the tiny VAE

# --- random components --------------------------------------------------------------------------------
START, END = "<|startoftext|>", "<|endoftext|>"

TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=32,
)
TINY_VAE = dict(
    block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32)

# runwayml/stable-diffusion-v1-5 with LCM-Dreamshaper-v7's guidance-embedding input (time_cond_proj_dim)
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=256,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")

# SDXL-class: two text encoders (hidden states concatenated: cross_attention_dim = 32 + 32), the second's
# pooled projection and 6 time ids embedded by addition_time_embed_dim (6 * 8 + 32 = 80 inputs)
TINY_SDXL_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
    cross_attention_dim=64, norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, time_cond_proj_dim=32,
)
TINY_TEXT_2 = dict(TINY_TEXT, hidden_act="gelu")
# stabilityai/stable-diffusion-xl-base-1.0 (CLIP ViT-L + OpenCLIP ViT-bigG), with lcm-sdxl's time_cond_proj_dim
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, time_cond_proj_dim=256,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = dict(SD15_TEXT, projection_dim=768)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")

SIZES = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT),
         "tiny-sdxl": (TINY_SDXL_UNET, TINY_VAE, TINY_TEXT), "sdxl": (SDXL_UNET, SDXL_VAE, SDXL_TEXT)}
SECOND_TEXT = {"tiny-sdxl": TINY_TEXT_2, "sdxl": SDXL_TEXT_2}  # the sdxl family's second text encoder


def byte_level_clip_tokenizer(folder: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is the 256 byte symbols (plain and word-final) and no merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + [START, END]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def lcm_scheduler(**overrides) -> LCMScheduler:
    """LCM-Dreamshaper-v7's scheduler configuration."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                  original_inference_steps=50, timestep_scaling=10.0, clip_sample=False, set_alpha_to_one=True)
    return LCMScheduler(**{**config, **overrides})


def random_components(folder: str | Path, size: str = "tiny", seed: int = 0, device=None, **unet_overrides) -> dict:
    """unet, vae, text_encoder, tokenizer and scheduler with seeded random weights (`folder` holds the
    tokenizer files); sdxl sizes add text_encoder_2 (with projection) and tokenizer_2 (padding with "!",
    as SDXL's). `device` builds the networks there directly (fast initialisation on a GPU)."""
    unet_config, vae_config, text_config = SIZES[size]
    tokenizer = byte_level_clip_tokenizer(Path(folder) / "tokenizer")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.convert_tokens_to_ids(START),
               eos_token_id=tokenizer.convert_tokens_to_ids(END), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    out = {}
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**{**unet_config, **unet_overrides})
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **text_config))
        if size in SECOND_TEXT:
            tokenizer_2 = byte_level_clip_tokenizer(Path(folder) / "tokenizer_2")
            tokenizer_2.pad_token = "!"
            out["tokenizer_2"] = tokenizer_2
            out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
                **dict(ids, pad_token_id=tokenizer_2.pad_token_id), **SECOND_TEXT[size]))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=lcm_scheduler(), **out)



# --- the lcm world ------------------------------------------------------------------------------------
def tiny_components(folder: Path, seed: int = 0, **unet_overrides) -> dict:
    return random_components(folder, "tiny", seed=seed, **unet_overrides)


ADAPTER_KWARGS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets", "lora_init": "init"}
SETTINGS_KWARGS = {"resolution": "resolution", "guidance_scale": "guidance_scale", "chain_scheduler": "scheduler",
                   "tcd_gamma": "tcd_gamma", "heldout_fraction": "heldout_fraction",
                   "vae_checkpointing": "vae_checkpointing"}


def world_kwargs(lora_rank=8, resolution=RESOLUTION, **kwargs) -> dict:
    """LCMWorld's / PixArtLCMWorld's keyword arguments from flat ones: lora_rank, lora_alpha, lora_targets, lora_init
    (our adapter; lora_rank None: none), resolution, guidance_scale, chain_scheduler, tcd_gamma, heldout_fraction,
    vae_checkpointing (the lcm section), anything else as it is (device, mixed_precision, base_adapter)."""
    kwargs.update(lora_rank=lora_rank, resolution=resolution)
    adapter = {ADAPTER_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in ADAPTER_KWARGS}
    settings = {SETTINGS_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in SETTINGS_KWARGS}
    return dict(kwargs, adapter=adapter_spec(**adapter), settings=LCMConfig(**settings))


def tiny_world(folder: Path, seed: int = 0, unet_overrides: dict | None = None, **kwargs) -> LCMWorld:
    return LCMWorld(**tiny_components(folder, seed, **(unet_overrides or {})), **world_kwargs(**kwargs))


def stock_pipeline(components: dict, cls=LatentConsistencyModelPipeline):
    pipe = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb_lora_b(network: torch.nn.Module, adapter: str, seed: int = 1, std: float = 0.2) -> None:
    """Give an adapter a visible effect: peft initialises lora_B to zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if ".lora_B." in name and f".{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def save_tiny_pipeline(folder: Path, seed: int = 0, **unet_overrides) -> Path:
    """A diffusers pipeline folder, as a hub snapshot would be."""
    stock_pipeline(tiny_components(folder / "build", seed, **unet_overrides)).save_pretrained(folder / "model")
    return folder / "model"


def write_random_lora(folder: Path, seed: int = 0, rank: int = 4, **unet_overrides) -> Path:
    """A diffusers-format LoRA for the tiny UNet (standing in for an LCM-LoRA)."""
    unet = tiny_components(folder / "build", seed, **unet_overrides)["unet"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                     adapter_name="made")
    perturb_lora_b(unet, "made", seed=seed + 7)
    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="made"))
    LatentConsistencyModelPipeline.save_lora_weights(folder / "lora", unet_lora_layers=weights)
    return folder / "lora"


# --- CLIP-family rewards --------------------------------------------------------------------------------
def tiny_clip(folder: Path, seed: int = 0) -> tuple[Path, CLIPModel]:
    """A transformers CLIPModel folder (model + byte-level tokenizer); exact GELU as open_clip ViT-H."""
    tokenizer = byte_level_clip_tokenizer(folder)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(
        text_config=dict(max_position_embeddings=77, **ids, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16,
    ))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def write_open_clip_checkpoint(model: CLIPModel, path: Path) -> Path:
    """The model in open_clip's naming, wrapped as HPSv2 publishes it ({"state_dict": ...}, a .pt pickle)."""
    hf = model.state_dict()
    oc = {
        "logit_scale": hf["logit_scale"],
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t(),
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].t(),
    }
    towers = (("text_model", "", model.config.text_config), ("vision_model", "visual.", model.config.vision_config))
    for hf_tower, oc_tower, tower_config in towers:
        for i in range(tower_config.num_hidden_layers):
            h, o = f"{hf_tower}.encoder.layers.{i}.", f"{oc_tower}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                oc[f"{o}attn.in_proj_{kind}"] = torch.cat([hf[f"{h}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                oc[f"{o}attn.out_proj.{kind}"] = hf[f"{h}self_attn.out_proj.{kind}"]
                oc[f"{o}ln_1.{kind}"] = hf[f"{h}layer_norm1.{kind}"]
                oc[f"{o}ln_2.{kind}"] = hf[f"{h}layer_norm2.{kind}"]
                oc[f"{o}mlp.c_fc.{kind}"] = hf[f"{h}mlp.fc1.{kind}"]
                oc[f"{o}mlp.c_proj.{kind}"] = hf[f"{h}mlp.fc2.{kind}"]
    torch.save({"epoch": 10, "name": "tiny", "state_dict": {k: v.clone() for k, v in oc.items()}}, path)
    return path


def linear_head_tensors(dims: tuple[int, ...], seed: int = 0, prefix: str = "layers.") -> dict[str, torch.Tensor]:
    """Linear layers at Sequential indices 0, 2, 4, 6, 7 (Dropouts between the first four), as LAION's
    improved aesthetic predictor and ImageReward's MLP store them."""
    generator = torch.Generator().manual_seed(seed)
    indices = [0, 2, 4, 6, 7][: len(dims) - 1]
    out = {}
    for index, (fan_in, fan_out) in zip(indices, zip(dims, dims[1:])):
        out[f"{prefix}{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        out[f"{prefix}{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
    return out


# --- ImageReward --------------------------------------------------------------------------------------
BERT_WORDS = ["a", "an", "the", "cat", "dog", "photo", "of", "red", "blue", "on", "in", "grass", "##s"]


def write_image_reward(folder: Path, seed: int = 0) -> tuple[Path, BlipVisionModel, BlipTextModel]:
    """ImageReward.pt (BLIP ViT in timm naming, MED text encoder in BERT naming, MLP head),
    med_config.json and a BERT vocab.txt; returns the folder and the modules the weights came from."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS + list("abcdefghijklmnopqrstuvwxyz")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    vocab_size = len(vocab) + 2  # BLIP adds [DEC] and [ENC]
    med = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=40, vocab_size=vocab_size, layer_norm_eps=1e-12, hidden_act="gelu",
               encoder_width=64, add_cross_attention=True, pad_token_id=0)
    (folder / "med_config.json").write_text(json.dumps(med), encoding="utf-8")

    torch.manual_seed(seed)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=32, patch_size=8, layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=40,
    ), add_pooling_layer=False)
    v = vision.state_dict()
    vit = {
        "cls_token": v["embeddings.class_embedding"],
        "pos_embed": v["embeddings.position_embedding"],
        "patch_embed.proj.weight": v["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": v["embeddings.patch_embedding.bias"],
        "norm.weight": v["post_layernorm.weight"],
        "norm.bias": v["post_layernorm.bias"],
    }
    for i in range(2):
        for kind in ("weight", "bias"):
            h, b = f"encoder.layers.{i}.", f"blocks.{i}."
            vit[f"{b}norm1.{kind}"] = v[f"{h}layer_norm1.{kind}"]
            vit[f"{b}norm2.{kind}"] = v[f"{h}layer_norm2.{kind}"]
            vit[f"{b}attn.qkv.{kind}"] = v[f"{h}self_attn.qkv.{kind}"]
            vit[f"{b}attn.proj.{kind}"] = v[f"{h}self_attn.projection.{kind}"]
            vit[f"{b}mlp.fc1.{kind}"] = v[f"{h}mlp.fc1.{kind}"]
            vit[f"{b}mlp.fc2.{kind}"] = v[f"{h}mlp.fc2.{kind}"]
    checkpoint = {f"blip.visual_encoder.{k}": t for k, t in vit.items()}
    checkpoint.update({f"blip.text_encoder.{k}": t for k, t in text.state_dict().items()})
    checkpoint["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # BLIP saved this buffer
    checkpoint["blip.vision_proj.weight"] = torch.zeros(8, 64)  # BLIP_Pretrain extras that ImageReward never uses
    checkpoint.update({f"mlp.{k}": t for k, t in linear_head_tensors((32, 16, 8, 4, 2, 1), seed).items()})
    torch.save({k: t.clone() for k, t in checkpoint.items()}, folder / "ImageReward.pt")
    return folder, vision, text


# --- the distilled families (tests/test_distilled_families.py) -------------------------------------------------
# stabilityai/sd-turbo's and sdxl-turbo's scheduler configs (trailing spacing), SDXL base's (leading, for Lightning)
TURBO_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                       interpolation_type="linear", use_karras_sigmas=False, timestep_spacing="trailing")
BASE_UNET = {"time_cond_proj_dim": None}  # SD-2.1 / SDXL UNets: no guidance embedding


def save_turbo_pipeline(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny pipeline folder laid out as stabilityai/sd-turbo (StableDiffusionPipeline, EulerDiscreteScheduler,
    trailing) or stabilityai/sdxl-turbo (StableDiffusionXLPipeline, EulerAncestralDiscreteScheduler, trailing)."""
    from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)

    if family == "sd":
        components = random_components(folder / "build", "tiny", seed=seed, **BASE_UNET)
        components["scheduler"] = EulerDiscreteScheduler.from_config(TURBO_SCHEDULER)
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        components = random_components(folder / "build", "tiny-sdxl", seed=seed, **BASE_UNET)
        components["scheduler"] = EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER)
        pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def save_sdxl_base_and_lightning_unet(folder: Path) -> tuple[Path, Path]:
    """A tiny SDXL base folder (EulerDiscreteScheduler, leading, as stabilityai/stable-diffusion-xl-base-1.0) and,
    beside it, a UNet state dict of the same config in ByteDance's file name (sdxl_lightning_4step_unet.safetensors)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    components = random_components(folder / "build", "tiny-sdxl", **BASE_UNET)
    components["scheduler"] = EulerDiscreteScheduler.from_config(dict(TURBO_SCHEDULER, timestep_spacing="leading"))
    StableDiffusionXLPipeline(**components, add_watermarker=False).save_pretrained(folder / "base")
    lightning = random_components(folder / "build2", "tiny-sdxl", seed=5, **BASE_UNET)["unet"]
    path = folder / "SDXL-Lightning" / "sdxl_lightning_4step_unet.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in lightning.state_dict().items()}, path)
    return folder / "base", path


def write_hyper_lora(folder: Path, family: str = "sd", seed: int = 3) -> Path:
    """A diffusers LoRA file for the tiny base UNet in ByteDance/Hyper-SD's file name (Hyper-SD15-2steps-lora)."""
    size, name = ("tiny", "Hyper-SD15-2steps-lora.safetensors") if family == "sd" else (
        "tiny-sdxl", "Hyper-SDXL-2steps-lora.safetensors")
    unet = random_components(folder / "build", size, seed=seed, **BASE_UNET)["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "made")
    perturb_lora_b(unet, "made", seed=seed)
    LatentConsistencyModelPipeline.save_lora_weights(folder / "Hyper-SD", weight_name=name,
                                                     unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="made"))
    return folder / "Hyper-SD"


def gemma_fixture_tokenizer(folder: Path):
    """A Gemma fast tokenizer in the publisher's layout (tokenizer.json + tokenizer_config.json): a byte-level BPE with
    no merges (every byte a token) and Gemma's special tokens, so that no sentencepiece model is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


TINY_SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=1,
                 num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                 sample_size=16, patch_size=1, qk_norm="rms_norm_across_heads", guidance_embeds=True,
                 guidance_embeds_scale=0.1)
TINY_DC_AE = dict(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                  decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                  decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                  encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                  upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                  scaling_factor=0.41407)


def save_sana_sprint_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny folder laid out as Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers: SanaSprintPipeline with a
    Gemma-2 text encoder and its fast tokenizer, AutoencoderDC (here 2x), SanaTransformer2DModel with the guidance
    embedding, SCMScheduler (sigma_data 0.5)."""
    from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_fixture_tokenizer(folder / "build" / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    pipe = SanaSprintPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=AutoencoderDC(**TINY_DC_AE),
                              transformer=SanaTransformer2DModel(**TINY_SANA), scheduler=SCMScheduler())
    pipe.save_pretrained(folder / "model")
    return folder / "model"

# --- one tiny folder per lcm family, as its publisher lays it out (the guarantees matrix) ------------------
LCM_FAMILIES = ("sd15-lcm", "sd15-lcm-lora", "lcm-sdxl", "tcd", "pixart-lcm")


def save_family(folder: Path, family: str) -> tuple[Path, list[str]]:
    """A tiny pipeline folder of `family` and the `cmalign train` flags that run it: SD-1.5 LCM (an LCM UNet:
    guidance embedding, guidance 8); an SD-1.5 base + an LCM-LoRA (fused, guidance 1: no CFG); LCM-SDXL (two
    text encoders, guidance 8); TCD (an SD-1.5 base with a saved LCM scheduler, the TCD chain with gamma 0.3 and
    CFG 1.5); PixArt-LCM (a transformer and T5, guidance 0)."""
    from diffusers import StableDiffusionPipeline

    no_w = {"time_cond_proj_dim": None}
    model = folder / "model"
    if family == "sd15-lcm":
        return save_tiny_pipeline(folder), ["--lcm.guidance-scale", "8"]
    if family == "sd15-lcm-lora":
        stock_pipeline(tiny_components(folder / "build", **no_w), cls=StableDiffusionPipeline).save_pretrained(model)
        return model, ["--lcm.guidance-scale", "1", "--lcm.lora", str(write_random_lora(folder / "lcm_lora", **no_w))]
    if family == "tcd":
        stock_pipeline(tiny_components(folder / "build", **no_w), cls=StableDiffusionPipeline).save_pretrained(model)
        return model, ["--lcm.guidance-scale", "1.5", "--lcm.scheduler", "tcd", "--lcm.tcd-gamma", "0.3"]
    if family == "lcm-sdxl":
        from test_lcm_families import save_sdxl_pipeline

        return save_sdxl_pipeline(folder), ["--lcm.guidance-scale", "8"]
    if family == "pixart-lcm":
        from test_lcm_dit import save_pixart

        return save_pixart(folder), ["--lcm.guidance-scale", "0"]
    raise ValueError(f"unknown lcm family {family!r}")


def family_stock_pipeline(model: Path, family: str, flags: list[str], adapter: Path):
    """The publisher's own pipeline for `family` with the exported adapter loaded (and an LCM-LoRA fused first),
    and the keyword arguments its call needs beyond prompts, steps and guidance."""
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, TCDScheduler
    from peft import PeftModel

    kwargs = {}
    if family == "pixart-lcm":  # diffusers has no PixArt LoRA loader: peft's own
        pipe = PixArtAlphaPipeline.from_pretrained(model)
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, adapter)
        kwargs = {"use_resolution_binning": False, "clean_caption": False}  # tiny sizes are in no aspect-ratio bin
    else:
        cls = {"sd15-lcm": LatentConsistencyModelPipeline, "lcm-sdxl": StableDiffusionXLPipeline}.get(family, StableDiffusionPipeline)
        pipe = cls.from_pretrained(model, **({"safety_checker": None, "requires_safety_checker": False}
                                             if cls is not StableDiffusionXLPipeline else {}))
        if family == "sd15-lcm-lora":
            pipe.load_lora_weights(flags[flags.index("--lcm.lora") + 1], adapter_name="lcm")
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        if family == "tcd":
            pipe.scheduler, kwargs = TCDScheduler.from_config(pipe.scheduler.config), {"eta": 0.3}
        pipe.load_lora_weights(adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs
