"""ImageReward (Xu et al. 2023) on transformers' BLIP classes.

The published checkpoint (THUDM/ImageReward: ImageReward.pt + med_config.json) holds BLIP's ViT-L/16
image encoder (timm naming), BLIP's BERT text encoder with cross-attention to the image (the "MED"
encoder, BERT naming) and a linear score head. The ViT maps onto BlipVisionModel and the BERT onto
BlipTextModel by renaming keys; the score is the head on the [CLS] state of the text encoder run over
the prompt while attending to the image, standardised by the published mean and std.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from ..errors import UserError
from ..hub import hub_errors, offline, resolve_file
from .common import LinearHead, freeze, load_tensors, model_pixels
from .registry import Reward

IMAGE_REWARD_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE, MED_CONFIG_FILE = "ImageReward.pt", "med_config.json"
BERT_TOKENIZER = "google-bert/bert-base-uncased"
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's standardisation
MAX_PROMPT_TOKENS = 35  # as ImageReward tokenises
BLIP_HEAD_WIDTH = 64  # BLIP's ViTs (base 768/12, large 1024/16) use 64-wide attention heads

_VIT_RENAMES = [
    (r"cls_token$", "embeddings.class_embedding"),
    (r"pos_embed$", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"norm\.", "post_layernorm."),
]


def blip_vit_to_transformers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BLIP's timm-style ViT state dict (without the visual_encoder. prefix) -> BlipVisionModel names."""
    out = {}
    for key, value in tensors.items():
        for pattern, replacement in _VIT_RENAMES:
            new, count = re.subn("^" + pattern, replacement, key)
            if count:
                out[new] = value
                break
        else:
            raise UserError(f"unexpected key in ImageReward's image encoder: visual_encoder.{key}")
    return out


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _count_layers(tensors: dict[str, torch.Tensor], pattern: str) -> int:
    return 1 + max(int(m[1]) for k in tensors if (m := re.match(pattern, k)))


def vision_config(vit: dict[str, torch.Tensor]) -> BlipVisionConfig:
    """The BlipVisionConfig that BLIP's ViT weights imply (sizes are read off the tensors)."""
    hidden = vit["cls_token"].shape[-1]
    patch = vit["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(vit["pos_embed"].shape[1] - 1)
    return BlipVisionConfig(
        hidden_size=hidden, intermediate_size=vit["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_layers(vit, r"blocks\.(\d+)\."), num_attention_heads=max(1, hidden // BLIP_HEAD_WIDTH),
        image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu",  # BLIP: eps 1e-6, exact GELU
    )


def text_config(med: dict, bert: dict[str, torch.Tensor]) -> BlipTextConfig:
    """BLIP's MED (BERT with cross-attention) as a BlipTextConfig; the image width comes from the weights."""
    return BlipTextConfig(
        vocab_size=bert["embeddings.word_embeddings.weight"].shape[0], hidden_size=med["hidden_size"],
        encoder_hidden_size=bert["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
        pad_token_id=med.get("pad_token_id", 0), is_decoder=True,  # is_decoder builds the cross-attention layers
    )


class ImageReward(Reward):
    name = "image_reward"

    def __init__(self, vision: BlipVisionModel, text: BlipTextModel, head: LinearHead, tokenizer, device,
                 dtype: torch.dtype):
        self.vision, self.text = freeze(vision, device, dtype), freeze(text, device, dtype)
        self.head = freeze(head, device, torch.float32)
        self.tokenizer, self.device, self.dtype = tokenizer, torch.device(device), dtype
        self.image_size = vision.config.image_size
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._tokens))
        if missing:
            enc = self.tokenizer(missing, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                 return_tensors="pt")
            self._tokens.update({p: (i, m) for p, i, m in zip(missing, enc.input_ids, enc.attention_mask)})
        ids, mask = zip(*(self._tokens[p] for p in prompts))
        return torch.stack(ids).to(self.device), torch.stack(mask).to(self.device)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = model_pixels(images.to(self.device), self.image_size, self.dtype)
        image_states = self.vision(pixel_values=pixels).last_hidden_state
        input_ids, attention_mask = self._tokenize(prompts)
        image_mask = torch.ones(image_states.shape[:2], dtype=torch.long, device=self.device)
        states = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_states,
                           encoder_attention_mask=image_mask).last_hidden_state
        return (self.head(states[:, 0].float()) - SCORE_MEAN) / SCORE_STD


def image_reward(device, dtype, path: str = IMAGE_REWARD_REPO, tokenizer: str | None = None) -> Reward:
    """`path`: a hub repo or folder with ImageReward.pt and med_config.json (or the .pt file, with
    med_config.json beside it). The BERT tokenizer comes from `tokenizer`, a vocab.txt in that folder,
    or google-bert/bert-base-uncased."""
    checkpoint = resolve_file(path, CHECKPOINT_FILE, "ImageReward checkpoint")
    med_path = checkpoint.parent / MED_CONFIG_FILE if Path(path).is_file() else resolve_file(path, MED_CONFIG_FILE, "ImageReward config")
    if not med_path.is_file():
        raise UserError(f"ImageReward: no {MED_CONFIG_FILE} beside {checkpoint}")
    tensors = load_tensors(checkpoint)
    vit, bert = _sub(tensors, "blip.visual_encoder."), _sub(tensors, "blip.text_encoder.")
    if not vit or not bert:
        raise UserError(f"{checkpoint} is not an ImageReward checkpoint (no blip.visual_encoder / blip.text_encoder)")
    with torch.device(device):  # random initialisation of a ViT-L is much faster on a GPU
        vision = BlipVisionModel(vision_config(vit))
        text = BlipTextModel(text_config(json.loads(med_path.read_text(encoding="utf-8")), bert), add_pooling_layer=False)
    _load_exact(vision, blip_vit_to_transformers(vit), checkpoint)
    # BERT naming matches BlipTextModel; position_ids is a buffer that BLIP saved and transformers rebuilds
    _load_exact(text, {k: v for k, v in bert.items() if k != "embeddings.position_ids"}, checkpoint)
    if tokenizer is None:
        tokenizer = str(checkpoint.parent) if (checkpoint.parent / "vocab.txt").is_file() else BERT_TOKENIZER
    with hub_errors(tokenizer, "BERT tokenizer"):
        bert_tokenizer = BertTokenizer.from_pretrained(tokenizer, local_files_only=offline())
    return ImageReward(vision, text, LinearHead(_sub(tensors, "mlp.")), bert_tokenizer, device, dtype)


def _load_exact(module: torch.nn.Module, tensors: dict[str, torch.Tensor], checkpoint: Path) -> None:
    result = module.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{checkpoint} does not fit ImageReward's architecture: missing {result.missing_keys[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}")
