"""Random-weight latent-consistency components built offline: tiny ones for tests and the CPU
benchmark, SD-1.5-sized (LCM-Dreamshaper-v7's configs) and SDXL-sized (stable-diffusion-xl-base-1.0
with lcm-sdxl's guidance input) ones for GPU speed and memory measurements.

Nothing here downloads: the tokenizer is a byte-level CLIP BPE with no merges (every byte is a
token), which exercises the real CLIPTokenizer code path without the 49k-token vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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
