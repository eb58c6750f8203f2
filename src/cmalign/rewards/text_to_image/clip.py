"""CLIP-family rewards on transformers' CLIPModel: CLIP score, PickScore, HPSv2 / v2.1 and the LAION
aesthetic predictor v2.

HPSv2 is published as an open_clip ViT-H-14 checkpoint; open_clip cannot be installed beside our
torch (it needs torchvision, whose PyPI wheels need CUDA torch), so `open_clip_to_transformers` maps its
keys onto a CLIPModel of the same architecture: open_clip's own model config (ViT-H-14.json, built in)
or a transformers CLIP config.

Each reward preprocesses images as its publisher's inference code does (see common.Preprocess) and
checks its tokenizer against the checkpoint's text tower (see common.check_tokenizer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from cmalign.errors import UserError
from cmalign.hub import hub_errors, offline, require_local, resolve_file
from cmalign.rewards.text_to_image.preprocess import LinearHead, Preprocess, check_tokenizer, clip_processor, freeze, hps_processor, load_tensors, tokenizer_source
from cmalign.rewards.registry import Reward

CLIP_L14 = "openai/clip-vit-large-patch14"
VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE = "yuvalkirstain/PickScore_v1"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# LAION's improved-aesthetic-predictor file, and the same head as trl-lib/ddpo-aesthetic-predictor ships it
AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_FILES = ("aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth")
# open_clip's model_configs/ViT-H-14.json (HPSv2 and PickScore's base model)
OPEN_CLIP_VIT_H14 = {"embed_dim": 1024,
                     "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
CLIP_TOKENIZER_FILES = "tokenizer.json, or vocab.json and merges.txt"


def flag(reward: str, component: str = "path") -> str:
    """The command-line way to give a component's local path."""
    return f"--reward-paths {reward}=PATH" if component == "path" else f"--reward-paths {reward}.{component}=PATH"


class CLIPEmbedder:
    """A frozen CLIPModel as a differentiable image embedder and a cached (no-grad) text embedder."""

    def __init__(self, model: CLIPModel, tokenizer, device, dtype: torch.dtype, preprocess: Preprocess | None = None):
        self.model = freeze(model, device, dtype)
        self.tokenizer, self.device, self.dtype = tokenizer, torch.device(device), dtype
        self.image_size = model.config.vision_config.image_size
        self.preprocess = preprocess or clip_processor(self.image_size)
        self.max_length = model.config.text_config.max_position_embeddings
        if tokenizer is not None:
            self.max_length = min(tokenizer.model_max_length, self.max_length)
        self._text: dict[str, torch.Tensor] = {}

    def image_embeddings(self, images01: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images01.to(self.device), self.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise UserError("this CLIP model was loaded without a tokenizer")
        # One prompt per call: a batch's float rounding depends on its size and company, so an embedding cached
        # from another batch than in an earlier run (a resumed run's cold cache) would differ in the last bits.
        for p in dict.fromkeys(p for p in prompts if p not in self._text):
            # Padding to the longest (PickScore) or to 77 (open_clip) gives the same features: the causal
            # mask keeps padding out of the end-of-text state that CLIP pools.
            tokens = self.tokenizer([p], padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt").to(self.device)
            features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            self._text[p] = F.normalize(features.pooler_output.float(), dim=-1)[0]
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
            raise UserError(f"aesthetic: the head expects {head.in_features}-d embeddings, the CLIP model gives "
                            f"{embedder.model.config.projection_dim} (LAION's head is for CLIP ViT-L/14: "
                            f"give {CLIP_L14} with {flag('aesthetic', 'clip')})")
        self.name, self.embedder = "aesthetic", embedder
        self.head = freeze(head, embedder.device, torch.float32)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.embedder.image_embeddings(images))


# --- tokenizers -----------------------------------------------------------------------------------------
def _has_clip_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def clip_special_ids(text_config) -> dict[str, int]:
    """The start/end-of-text ids the text tower expects. Configs with the legacy eos_token_id 2 (OpenAI's
    and LAION's on the hub) pool at the highest id, CLIP's end-of-text: the last two rows."""
    rows = text_config.vocab_size
    if text_config.eos_token_id == 2:
        return {"bos": rows - 2, "eos": rows - 1}
    return {"bos": text_config.bos_token_id, "eos": text_config.eos_token_id}


def load_clip_tokenizer(ref: str, reward: str, text_config, publisher: str) -> object:
    """A CLIP tokenizer from a folder or hub id, refused unless it fits the text tower."""
    source = Path(ref).expanduser()
    fix = (f"give the tokenizer files of {publisher} ({CLIP_TOKENIZER_FILES}) with {flag(reward, 'tokenizer')}")
    require_local(ref, f"{reward} tokenizer", flag(reward, "tokenizer"))
    if source.is_dir() and not _has_clip_tokenizer(source):
        raise UserError(f"{reward}: {source} has no tokenizer files; {fix}")
    with hub_errors(ref, f"{reward} tokenizer", flag(reward, "tokenizer")):
        # CLIPTokenizer, not AutoTokenizer: vocab.json + merges.txt without a tokenizer_config.json is enough
        tokenizer = CLIPTokenizer.from_pretrained(str(source) if source.is_dir() else ref, local_files_only=offline())
    check_tokenizer(tokenizer, text_config.vocab_size, reward=reward, source=tokenizer_source(ref), fix=fix,
                    special=clip_special_ids(text_config))
    return tokenizer


# --- loading --------------------------------------------------------------------------------------------
_EMBEDDERS: dict[tuple, CLIPEmbedder] = {}  # one copy per (weights, device, dtype): clip_score and aesthetic share ViT-L/14


def _check_text_rows(model: CLIPModel) -> None:
    rows = model.text_model.embeddings.token_embedding.num_embeddings
    if rows != model.config.text_config.vocab_size:  # a config that lies about its checkpoint
        raise UserError(f"CLIP text tower: {rows} embedding rows but vocab_size {model.config.text_config.vocab_size}")


def load_clip(path: str, tokenizer: str | None, device, dtype: torch.dtype, *, reward: str, publisher: str,
              component: str = "path", text: bool = True) -> CLIPEmbedder:
    """A transformers-format CLIPModel (hub id or folder: config.json + model.safetensors or
    pytorch_model.bin); with `text`, its tokenizer from `tokenizer` or the same place. The weights are
    loaded once per (path, device, dtype): clip_score and aesthetic share one ViT-L/14."""
    key = ("hf", str(path), str(tokenizer) if text else None, str(device), dtype)
    if key not in _EMBEDDERS:
        shared = next((e for k, e in _EMBEDDERS.items() if k[:2] == key[:2] and k[3:] == key[3:]), None)
        if shared is not None:
            model = shared.model
        else:
            with hub_errors(path, f"{reward} CLIP model", flag(reward, component)):
                model = CLIPModel.from_pretrained(path, local_files_only=offline())
            _check_text_rows(model)
        tok = load_clip_tokenizer(tokenizer or path, reward, model.config.text_config, publisher) if text else None
        _EMBEDDERS[key] = CLIPEmbedder(model, tok, device, dtype, clip_processor(model.config.vision_config.image_size))
    return _EMBEDDERS[key]


def open_clip_config(cfg: dict) -> CLIPConfig:
    """open_clip's model config (model_configs/NAME.json) as the transformers CLIPConfig of the same network."""
    try:
        vision, text = cfg["vision_cfg"], cfg["text_cfg"]
        act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
        vocab = text.get("vocab_size", 49408)
        return CLIPConfig(
            projection_dim=cfg["embed_dim"],
            text_config=dict(vocab_size=vocab, hidden_size=text["width"], num_hidden_layers=text["layers"],
                             num_attention_heads=text.get("heads", 8),
                             intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)),
                             max_position_embeddings=text.get("context_length", 77), hidden_act=act,
                             layer_norm_eps=1e-5, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0),
            vision_config=dict(hidden_size=vision["width"], num_hidden_layers=vision["layers"],
                               num_attention_heads=vision["width"] // vision.get("head_width", 64),
                               intermediate_size=int(vision["width"] * vision.get("mlp_ratio", 4.0)),
                               image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act=act,
                               layer_norm_eps=1e-5),
        )
    except (KeyError, TypeError) as exc:
        raise UserError(f"not an open_clip ViT model config (missing {exc})") from None


def load_architecture(architecture: str | None, reward: str) -> tuple[CLIPConfig, Path | None]:
    """The CLIPConfig of an open_clip checkpoint: None (open_clip's ViT-H-14, built in), open_clip's
    model config .json (e.g. ViT-H-14.json), a transformers CLIP config.json, its folder, or a hub id.
    Also returns a local folder that may hold the tokenizer."""
    if architecture is None:
        return open_clip_config(OPEN_CLIP_VIT_H14), None
    path = Path(architecture).expanduser()
    require_local(architecture, f"{reward} architecture", flag(reward, "architecture"))
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{reward} architecture {path} is not a JSON config ({exc})") from None
        if "vision_cfg" in cfg:
            return open_clip_config(cfg), None
        with hub_errors(path, f"{reward} architecture config", flag(reward, "architecture")):
            return CLIPConfig.from_dict(cfg), path.parent
    with hub_errors(architecture, f"{reward} architecture config", flag(reward, "architecture")):
        config = CLIPConfig.from_pretrained(architecture, local_files_only=offline())
    return config, path if path.is_dir() else None


def load_open_clip(checkpoint: Path, architecture: str | None, tokenizer: str | None, device, dtype: torch.dtype,
                   *, reward: str) -> CLIPEmbedder:
    """An open_clip checkpoint file mapped onto a CLIPModel of `architecture`, preprocessed as HPSv2."""
    key = ("open_clip", str(checkpoint), str(architecture), str(tokenizer), str(device), dtype)
    if key not in _EMBEDDERS:
        config, folder = load_architecture(architecture, reward)
        mapped = open_clip_to_transformers(load_tensors(checkpoint))
        with torch.device(device):  # random initialisation of a ViT-H is much faster on a GPU
            model = CLIPModel(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = [k for k, v in mapped.items() if k in shapes and tuple(v.shape) != shapes[k]]
        result = model.load_state_dict({k: v for k, v in mapped.items() if k not in wrong}, strict=False)
        if result.missing_keys or result.unexpected_keys or wrong:
            raise UserError(f"{reward}: checkpoint {checkpoint} does not fit the architecture "
                            f"{architecture or 'open_clip ViT-H-14'}: missing {result.missing_keys[:3]}, unexpected "
                            f"{result.unexpected_keys[:3]}, other shapes {wrong[:3]} (give the checkpoint's own "
                            f"open_clip model config with {flag(reward, 'architecture')})")
        _check_text_rows(model)
        if tokenizer is None:
            tokenizer = str(folder) if folder is not None and _has_clip_tokenizer(folder) else VIT_H14
        tok = load_clip_tokenizer(tokenizer, reward, model.config.text_config, VIT_H14)
        _EMBEDDERS[key] = CLIPEmbedder(model, tok, device, dtype, hps_processor(config.vision_config.image_size))
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


# --- the rewards (keyword parameters are the components: --reward-paths NAME.COMPONENT=PATH) ------------
def clip_score(device, dtype, path: str = CLIP_L14, tokenizer: str | None = None) -> Reward:
    """path: a transformers CLIP folder or hub id; tokenizer: its tokenizer files (default: the same folder)."""
    return CLIPSimilarity("clip_score", load_clip(path, tokenizer, device, dtype, reward="clip_score", publisher=path))


def pickscore(device, dtype, path: str = PICKSCORE, tokenizer: str | None = None) -> Reward:
    """path: PickScore_v1 (config.json + model.safetensors or pytorch_model.bin); tokenizer: PickScore's
    processor, laion/CLIP-ViT-H-14-laion2B-s32B-b79K (default: tokenizer files in `path`, or that hub id)."""
    if tokenizer is None and not Path(path).expanduser().is_dir():
        tokenizer = VIT_H14  # the published inference code takes its processor from the base model
    embedder = load_clip(path, tokenizer, device, dtype, reward="pickscore", publisher=VIT_H14)
    return CLIPSimilarity("pickscore", embedder, scale=float(embedder.model.logit_scale.exp()))


def hpsv2(device, dtype, version: str = "v2", path: str = HPS_REPO, architecture: str | None = None,
          tokenizer: str | None = None) -> Reward:
    """HPSv2 (v2 or v2.1). path: HPS_v2_compressed.pt / HPS_v2.1_compressed.pt, a folder holding it, or a hub
    repo; architecture: open_clip's ViT-H-14 (built in) or a config file/folder; tokenizer: ViT-H-14's."""
    if version not in HPS_FILES:
        raise UserError(f"HPS version must be one of {', '.join(HPS_FILES)}, got {version!r}")
    name = "hpsv2" if version == "v2" else "hpsv2_1"
    checkpoint = resolve_file(path, HPS_FILES[version], f"{name} checkpoint", flag(name))
    return CLIPSimilarity(name, load_open_clip(checkpoint, architecture, tokenizer, device, dtype, reward=name))


def aesthetic(device, dtype, path: str = AESTHETIC_REPO, clip: str = CLIP_L14) -> Reward:
    """path: the head (LAION's sac+logos+ava1-l14-linearMSE.pth, trl-lib's aesthetic-model.pth, or a
    .safetensors), a folder holding it, or a hub repo; clip: CLIP ViT-L/14 in transformers format."""
    head = LinearHead(load_tensors(resolve_file(path, AESTHETIC_FILES, "aesthetic predictor head", flag("aesthetic"))))
    embedder = load_clip(clip, None, device, dtype, reward="aesthetic", publisher=CLIP_L14, component="clip", text=False)
    return AestheticScore(embedder, head)
