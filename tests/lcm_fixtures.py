"""Tiny random-weight models for the lcm world and its rewards, built offline in seconds.

The reward checkpoints are written in their publishers' own formats (open_clip names for HPSv2,
improved-aesthetic-predictor names, BLIP/ImageReward names) by code that states those layouts
independently of the loaders' mappings, so the tests check the mappings rather than echo them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import LatentConsistencyModelPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from transformers import BlipTextConfig, BlipVisionConfig, CLIPConfig, CLIPModel
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from cmalign.worlds.lcm.unet import LCMWorld
from cmalign.worlds.lcm.testing import byte_level_clip_tokenizer, random_components

RESOLUTION = 32  # pixels; 16 x 16 latents with the tiny VAE


# --- the lcm world ------------------------------------------------------------------------------------
def tiny_components(folder: Path, seed: int = 0, **unet_overrides) -> dict:
    return random_components(folder, "tiny", seed=seed, **unet_overrides)


def tiny_world(folder: Path, seed: int = 0, unet_overrides: dict | None = None, **world_kwargs) -> LCMWorld:
    world_kwargs.setdefault("resolution", RESOLUTION)
    return LCMWorld(**tiny_components(folder, seed, **(unet_overrides or {})), **world_kwargs)


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
