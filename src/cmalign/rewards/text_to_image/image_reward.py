"""ImageReward (Xu et al. 2023) on transformers' BLIP classes.

The published checkpoint (THUDM/ImageReward: ImageReward.pt + med_config.json) holds BLIP's ViT-L/16
image encoder (timm naming), BLIP's BERT text encoder with cross-attention to the image (the "MED"
encoder, BERT naming) and a linear score head. The ViT maps onto BlipVisionModel and the BERT onto
BlipTextModel by renaming keys; the score is the head on the [CLS] state of the text encoder run over
the prompt while attending to the image, standardised by the published mean and std. Images are
preprocessed as ImageReward.score does (torchvision Resize(224, BICUBIC) + CenterCrop on a PIL image),
prompts tokenised by BLIP's BERT tokenizer (bert-base-uncased plus [DEC] and [ENC]), checked against the
checkpoint's word embeddings.
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

from cmalign.errors import UserError
from cmalign.hub import hub_errors, offline, require_local, resolve_file
from cmalign.rewards.text_to_image.preprocess import LinearHead, check_tokenizer, freeze, load_tensors, tokenizer_source, torchvision_pil
from cmalign.rewards.registry import Reward

IMAGE_REWARD_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE, MED_CONFIG_FILE = "ImageReward.pt", "med_config.json"
BERT_TOKENIZER = "google-bert/bert-base-uncased"
BLIP_TOKENS = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}  # BLIP's init_tokenizer adds these
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
        self.preprocess = torchvision_pil(self.image_size)
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
        pixels = self.preprocess(images.to(self.device), self.dtype)
        image_states = self.vision(pixel_values=pixels).last_hidden_state
        input_ids, attention_mask = self._tokenize(prompts)
        image_mask = torch.ones(image_states.shape[:2], dtype=torch.long, device=self.device)
        states = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_states,
                           encoder_attention_mask=image_mask).last_hidden_state
        return (self.head(states[:, 0].float()) - SCORE_MEAN) / SCORE_STD


def _flag(component: str = "path") -> str:
    return "--reward-paths image_reward=PATH" if component == "path" else f"--reward-paths image_reward.{component}=PATH"


def _has_bert_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()


def load_bert_tokenizer(ref: str, rows: int, pad_token_id: int):
    """BLIP's tokenizer: bert-base-uncased (a folder with vocab.txt or tokenizer.json, a vocab.txt, or a
    hub id) plus [DEC] and [ENC], refused unless it fills the checkpoint's word embeddings exactly."""
    fix = (f"give bert-base-uncased's tokenizer files ({BERT_TOKENIZER}: vocab.txt, or tokenizer.json) with "
           f"{_flag('tokenizer')}")
    require_local(ref, "image_reward tokenizer", _flag("tokenizer"))
    path = Path(ref).expanduser()
    if path.is_dir() and not _has_bert_tokenizer(path):
        raise UserError(f"image_reward: {path} has no tokenizer files; {fix}")
    with hub_errors(ref, "image_reward BERT tokenizer", _flag("tokenizer")):
        if path.is_file():  # a vocab.txt, one token a line (BertTokenizer(vocab_file=) is ignored by transformers 5)
            lines = path.read_text(encoding="utf-8").splitlines()
            tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(lines)})
        else:
            tokenizer = BertTokenizer.from_pretrained(str(path) if path.is_dir() else ref, local_files_only=offline())
    tokenizer.add_special_tokens(BLIP_TOKENS)
    check_tokenizer(tokenizer, rows, reward="image_reward", source=tokenizer_source(ref), fix=fix,
                    special={"pad": pad_token_id, "cls": None, "sep": None})
    return tokenizer


def image_reward(device, dtype, path: str = IMAGE_REWARD_REPO, config: str | None = None,
                 tokenizer: str | None = None) -> Reward:
    """path: THUDM/ImageReward's ImageReward.pt (the file, a folder holding it, or the hub repo); config:
    its med_config.json (default: beside the checkpoint, or in the same repo); tokenizer: bert-base-uncased
    (default: tokenizer files beside the checkpoint, or google-bert/bert-base-uncased)."""
    checkpoint = resolve_file(path, CHECKPOINT_FILE, "image_reward checkpoint", _flag())
    if config is not None:
        med_path = resolve_file(config, MED_CONFIG_FILE, "image_reward config", _flag("config"))
    elif Path(path).expanduser().exists():
        med_path = checkpoint.parent / MED_CONFIG_FILE
        if not med_path.is_file():
            raise UserError(f"image_reward: no {MED_CONFIG_FILE} beside {checkpoint}; put THUDM/ImageReward's "
                            f"{MED_CONFIG_FILE} there or give it with {_flag('config')}")
    else:
        med_path = resolve_file(path, MED_CONFIG_FILE, "image_reward config", _flag("config"))
    try:
        med = json.loads(med_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"image_reward config {med_path} is not readable JSON ({exc})") from None
    tensors = load_tensors(checkpoint)
    vit, bert = _sub(tensors, "blip.visual_encoder."), _sub(tensors, "blip.text_encoder.")
    if not vit or not bert:
        raise UserError(f"{checkpoint} is not an ImageReward checkpoint (no blip.visual_encoder / blip.text_encoder)")
    with torch.device(device):  # random initialisation of a ViT-L is much faster on a GPU
        vision = BlipVisionModel(vision_config(vit))
        text = BlipTextModel(text_config(med, bert), add_pooling_layer=False)
    _load_exact(vision, blip_vit_to_transformers(vit), checkpoint)
    # BERT naming matches BlipTextModel; position_ids is a buffer that BLIP saved and transformers rebuilds
    _load_exact(text, {k: v for k, v in bert.items() if k != "embeddings.position_ids"}, checkpoint)
    if tokenizer is None:
        local = Path(path).expanduser()
        folder = local if local.is_dir() else checkpoint.parent
        tokenizer = str(folder) if local.exists() and _has_bert_tokenizer(folder) else BERT_TOKENIZER
    rows = bert["embeddings.word_embeddings.weight"].shape[0]
    bert_tokenizer = load_bert_tokenizer(tokenizer, rows, med.get("pad_token_id", 0))
    return ImageReward(vision, text, LinearHead(_sub(tensors, "mlp.")), bert_tokenizer, device, dtype)


def _load_exact(module: torch.nn.Module, tensors: dict[str, torch.Tensor], checkpoint: Path) -> None:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    wrong = [k for k, v in tensors.items() if k in shapes and tuple(v.shape) != shapes[k]]
    result = module.load_state_dict({k: v for k, v in tensors.items() if k not in wrong}, strict=False)
    if result.missing_keys or result.unexpected_keys or wrong:
        raise UserError(f"{checkpoint} does not fit ImageReward's architecture (med_config.json): missing "
                        f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}, other shapes {wrong[:3]}")
