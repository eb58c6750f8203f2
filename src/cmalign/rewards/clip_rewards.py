"""CLIP-family rewards on transformers' CLIPModel: CLIP score, PickScore, HPSv2 / v2.1 and the LAION
aesthetic predictor v2.

HPSv2 is published as an open_clip ViT-H-14 checkpoint; open_clip cannot be installed beside our
torch, so `open_clip_to_transformers` maps its keys onto a CLIPModel built from the architecture's
transformers config (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the model HPSv2 was fine-tuned from).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from ..errors import UserError
from ..hub import hub_errors, offline, resolve_file
from .common import LinearHead, freeze, load_tensors, model_pixels
from .registry import Reward

CLIP_L14 = "openai/clip-vit-large-patch14"
VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE = "yuvalkirstain/PickScore_v1"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
AESTHETIC_REPO, AESTHETIC_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"


class CLIPEmbedder:
    """A frozen CLIPModel as a differentiable image embedder and a cached (no-grad) text embedder."""

    def __init__(self, model: CLIPModel, tokenizer, device, dtype: torch.dtype):
        self.model = freeze(model, device, dtype)
        self.tokenizer, self.device, self.dtype = tokenizer, torch.device(device), dtype
        self.image_size = model.config.vision_config.image_size
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
        self._text: dict[str, torch.Tensor] = {}

    def image_embeddings(self, images01: torch.Tensor) -> torch.Tensor:
        pixels = model_pixels(images01.to(self.device), self.image_size, self.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text))
        if missing:
            tokens = self.tokenizer(missing, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt").to(self.device)
            features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            self._text.update(zip(missing, F.normalize(features.pooler_output.float(), dim=-1)))
        return torch.stack([self._text[p] for p in prompts])

    def cosine(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_embeddings(images01) * self.text_embeddings(prompts)).sum(-1)


class CLIPSimilarity(Reward):
    """scale * cos(image, prompt): CLIP score (scale 1), PickScore (CLIP's logit scale), HPSv2 (scale 1)."""

    def __init__(self, name: str, embedder: CLIPEmbedder, scale: float = 1.0):
        self.name, self.embedder, self.scale = name, embedder, scale

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.scale * self.embedder.cosine(images, prompts)


class AestheticScore(Reward):
    """LAION aesthetic predictor v2: a linear head on the L2-normalised CLIP ViT-L/14 image embedding
    (about 1-10; prompts are ignored)."""

    def __init__(self, embedder: CLIPEmbedder, head: LinearHead):
        if head.in_features != embedder.model.config.projection_dim:
            raise UserError(f"aesthetic head expects {head.in_features}-d embeddings, the CLIP model gives "
                            f"{embedder.model.config.projection_dim}")
        self.name, self.embedder = "aesthetic", embedder
        self.head = freeze(head, embedder.device, torch.float32)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.embedder.image_embeddings(images))


# --- loading --------------------------------------------------------------------------------------------
_EMBEDDERS: dict[tuple, CLIPEmbedder] = {}  # one copy per (weights, device, dtype): clip_score and aesthetic share ViT-L/14


def _tokenizer(ref: str):
    with hub_errors(ref, "CLIP tokenizer"):
        return AutoTokenizer.from_pretrained(ref, local_files_only=offline())


def load_clip(path: str, tokenizer: str | None, device, dtype: torch.dtype) -> CLIPEmbedder:
    """A transformers-format CLIPModel (hub id or folder); the tokenizer from `tokenizer` or the same place."""
    key = ("hf", str(path), str(tokenizer), str(device), dtype)
    if key not in _EMBEDDERS:
        with hub_errors(path, "CLIP model"):
            model = CLIPModel.from_pretrained(path, local_files_only=offline())
        _EMBEDDERS[key] = CLIPEmbedder(model, _tokenizer(tokenizer or path), device, dtype)
    return _EMBEDDERS[key]


def load_open_clip(checkpoint: str, architecture: str, device, dtype: torch.dtype) -> CLIPEmbedder:
    """An open_clip checkpoint file mapped onto a CLIPModel of `architecture`'s transformers config."""
    key = ("open_clip", str(checkpoint), str(architecture), str(device), dtype)
    if key not in _EMBEDDERS:
        with hub_errors(architecture, "CLIP architecture config"):
            config = CLIPConfig.from_pretrained(architecture, local_files_only=offline())
        with torch.device(device):  # random initialisation of a ViT-H is much faster on a GPU
            model = CLIPModel(config)
        mapped = open_clip_to_transformers(load_tensors(checkpoint))
        result = model.load_state_dict(mapped, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"open_clip checkpoint {checkpoint} does not fit {architecture}: "
                            f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
        _EMBEDDERS[key] = CLIPEmbedder(model, _tokenizer(architecture), device, dtype)
    return _EMBEDDERS[key]


# open_clip names -> transformers CLIPModel names (prefix replacement); the two projections are stored
# transposed by open_clip (x @ proj), and attention's fused in_proj is split into q, k, v.
_OPEN_CLIP_PREFIXES = {
    "token_embedding": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final": "text_model.final_layer_norm",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1": "vision_model.embeddings.patch_embedding",
    "visual.ln_pre": "vision_model.pre_layrnorm",
    "visual.ln_post": "vision_model.post_layernorm",
}
_OPEN_CLIP_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "attn.out_proj": "self_attn.out_proj"}
_RESBLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")  # in_proj_weight: "_"


def _replace_prefix(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def open_clip_to_transformers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip (or OpenAI CLIP) ViT state dict to transformers' CLIPModel layout."""
    out, unknown = {}, []
    for key, value in tensors.items():
        if key in _OPEN_CLIP_TRANSPOSED:
            out[_OPEN_CLIP_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _RESBLOCK.match(key):
            visual, index, module, kind = m.groups()
            layer = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{index}"
            if module == "attn.in_proj":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    out[f"{layer}.self_attn.{name}.{kind}"] = part.contiguous()
            elif module in _OPEN_CLIP_BLOCK:
                out[f"{layer}.{_OPEN_CLIP_BLOCK[module]}.{kind}"] = value
            else:
                unknown.append(key)
        elif (new := _replace_prefix(key, _OPEN_CLIP_PREFIXES)) is not None:
            out[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"unexpected open_clip keys (not a plain CLIP ViT checkpoint): {', '.join(unknown[:3])}")
    return out


# --- the rewards ----------------------------------------------------------------------------------------
def clip_score(device, dtype, path: str = CLIP_L14, tokenizer: str | None = None) -> Reward:
    return CLIPSimilarity("clip_score", load_clip(path, tokenizer, device, dtype))


def pickscore(device, dtype, path: str = PICKSCORE, tokenizer: str | None = None) -> Reward:
    """PickScore_v1; the published repo has no tokenizer files, so its tokenizer is ViT-H-14's."""
    if tokenizer is None and path == PICKSCORE:
        tokenizer = VIT_H14
    embedder = load_clip(path, tokenizer, device, dtype)
    return CLIPSimilarity("pickscore", embedder, scale=float(embedder.model.logit_scale.exp()))


def hpsv2(device, dtype, version: str = "v2", path: str = HPS_REPO, architecture: str = VIT_H14) -> Reward:
    """HPSv2 (v2 or v2.1): `path` is the .pt/.safetensors file, a folder holding it, or a hub repo."""
    if version not in HPS_FILES:
        raise UserError(f"HPS version must be one of {', '.join(HPS_FILES)}, got {version!r}")
    checkpoint = resolve_file(path, HPS_FILES[version], f"HPS{version} checkpoint")
    name = "hpsv2" if version == "v2" else "hpsv2_1"
    return CLIPSimilarity(name, load_open_clip(checkpoint, architecture, device, dtype))


def aesthetic(device, dtype, path: str = AESTHETIC_REPO, clip: str = CLIP_L14, tokenizer: str | None = None,
              filename: str = AESTHETIC_FILE) -> Reward:
    """`path`: the head's .pth/.safetensors file, a folder holding `filename`, or a hub repo."""
    head = LinearHead(load_tensors(resolve_file(path, filename, "aesthetic predictor")))
    return AestheticScore(load_clip(clip, tokenizer, device, dtype), head)
