"""Tiny random-weight reward models laid out as their publishers ship them, and independent references
of the publishers' inference code (preprocessing from PIL, forwards from the checkpoints' own keys).

open_clip, the ImageReward package and hpsv2 cannot run here: they import torchvision, and PyPI's
torchvision wheels for torch 2.13 need CUDA torch (`torchvision::nms does not exist` on our CPU build).
So the references below re-implement what their published code does, from that code:
- PickScore (yuvalkirstain/PickScore README): CLIPProcessor + CLIPModel, logit_scale.exp() * cos.
- LAION aesthetic (improved-aesthetic-predictor simple_inference.py; DDPO's aesthetic_scorer.py): the MLP
  nn.Sequential on the L2-normalised CLIP ViT-L/14 image embedding, images by CLIPImageProcessor.
- HPSv2 (tgxs002/HPSv2 img_score.py, src/open_clip/transform.py, model.py): ToTensor, ResizeMaxSize
  (longest side to 224 with round(), torchvision tensor bicubic, zero pad), open_clip's VisionTransformer
  and TextTransformer (nn.MultiheadAttention blocks, causal mask, argmax pooling), cosine.
- ImageReward (THUDM/ImageReward ImageReward.py score()): torchvision Resize(224, BICUBIC) + CenterCrop
  on the PIL image, BLIP's tokenizer at max_length 35, [CLS] state, MLP, (r - mean) / std.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizer, CLIPConfig, CLIPModel

from lcm_fixtures import byte_level_clip_tokenizer, linear_head_tensors, write_image_reward, write_open_clip_checkpoint

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])
TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 514, "width": 32, "heads": 4, "layers": 2}}


# --- publisher layouts -------------------------------------------------------------------------------------
def clip_tokenizer_folder(folder: Path) -> Path:
    """CLIP BPE tokenizer files (vocab.json, merges.txt, tokenizer_config.json, ...): 256 bytes x 2 + 2."""
    byte_level_clip_tokenizer(folder / "build").save_pretrained(folder)
    shutil.rmtree(folder / "build")
    return folder


def clip_model(seed: int = 0, legacy_ids: bool = True) -> CLIPModel:
    """A tiny CLIPModel; `legacy_ids`: bos 0 / eos 2 in the config, as OpenAI's and LAION's hub configs."""
    ids = dict(bos_token_id=0, eos_token_id=2) if legacy_ids else dict(bos_token_id=512, eos_token_id=513)
    tower = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=514, max_position_embeddings=77, pad_token_id=1, **ids,
                                                  **tower),
                                 vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16))
    with torch.no_grad():
        model.logit_scale.fill_(4.0)
        # CLIP's initialisation (std 0.02) makes a tiny tower's embedding nearly independent of the image;
        # unit-gain weights let pixels, and so preprocessing, move the score
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "embedding" not in name.replace("patch_embedding", ""):
                param.copy_(torch.randn(param.shape) / param[0].numel() ** 0.5)
    return model.eval()


def hf_clip_folder(folder: Path, model: CLIPModel, tokenizer: bool = True, weights: str = "safetensors") -> Path:
    """A hub CLIP repo (openai/clip-vit-large-patch14, PickScore_v1): config.json, model.safetensors or
    pytorch_model.bin, preprocessor_config.json and (with `tokenizer`) the tokenizer files."""
    from transformers import CLIPImageProcessorPil

    model.save_pretrained(folder)
    if weights == "bin":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    if tokenizer:
        clip_tokenizer_folder(folder)
    return folder


def hps_folder(folder: Path, seed: int = 1) -> tuple[Path, CLIPModel]:
    """xswu/HPSv2 as published: HPS_v2_compressed.pt and HPS_v2.1_compressed.pt ({"state_dict": open_clip
    names}), beside open_clip's model config of the architecture (ViT-H-14.json's format)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = clip_model(seed)
    write_open_clip_checkpoint(model, folder / "HPS_v2_compressed.pt")
    write_open_clip_checkpoint(clip_model(seed + 1), folder / "HPS_v2.1_compressed.pt")
    (folder / "ViT-tiny.json").write_text(json.dumps(TINY_OPEN_CLIP), encoding="utf-8")
    return folder, model


def aesthetic_folder(folder: Path, seed: int = 2) -> Path:
    """LAION's improved-aesthetic-predictor file: torch.save(MLP.state_dict()) of Linear(16, ...)->1."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(linear_head_tensors((16, 32, 8, 4, 2, 1), seed), folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder


def unique_vocab(path: Path) -> list[str]:
    """lcm_fixtures' BERT vocabulary lists "a" twice (a word and a letter), so it has one id fewer than
    lines; a real vocab.txt has each token once. The repeat becomes the word piece "##a", in place
    (then the file fills the checkpoint's rows: lines + [DEC] + [ENC]). Rewrites the file too."""
    seen, lines = set(), []
    for token in path.read_text(encoding="utf-8").splitlines():
        lines.append(token if token not in seen else "##" + token)
        seen.add(token)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def image_reward_folders(root: Path) -> tuple[Path, Path, object, object]:
    """THUDM/ImageReward (ImageReward.pt + med_config.json, no tokenizer) and a bert-base-uncased-style
    tokenizer folder (vocab.txt + tokenizer_config.json); also the BLIP modules the weights came from."""
    build, vision, text = write_image_reward(root / "build")
    # BERT's initialisation (std 0.02) leaves the cross-attention to the image nearly silent, so images
    # would barely move the score; give those layers unit-gain weights, in the checkpoint and the module.
    state = torch.load(build / "ImageReward.pt", weights_only=True)
    generator = torch.Generator().manual_seed(7)
    for key, value in state.items():
        if ".crossattention." in key and key.endswith("weight") and value.ndim == 2:
            state[key] = torch.randn(value.shape, generator=generator) / value.shape[1] ** 0.5
    # likewise the ViT's patch embedding (std 0.02 against unit-scale position embeddings): the same
    # tensor in both namings
    patch = torch.randn(state["blip.visual_encoder.patch_embed.proj.weight"].shape, generator=generator) / 192 ** 0.5
    state["blip.visual_encoder.patch_embed.proj.weight"] = patch
    with torch.no_grad():
        vision.embeddings.patch_embedding.weight.copy_(patch)
    torch.save(state, build / "ImageReward.pt")
    text.load_state_dict({k[len("blip.text_encoder."):]: v for k, v in state.items()
                          if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")})
    (root / "ImageReward").mkdir(parents=True)
    for name in ("ImageReward.pt", "med_config.json"):
        shutil.copy(build / name, root / "ImageReward" / name)
    bert = root / "bert-base-uncased"
    lines = unique_vocab(build / "vocab.txt")
    BertTokenizer(vocab={t: i for i, t in enumerate(lines)}).save_pretrained(bert)  # tokenizer.json + config
    (bert / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "ImageReward", bert, vision, text


# --- images ------------------------------------------------------------------------------------------------
def uint8_images(shape: tuple[int, int], batch: int = 2, seed: int = 0) -> np.ndarray:
    """(B, H, W, 3) uint8: smooth colour fields plus noise, so that resampling and offsets both matter."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(batch):
        a, b, c = rng.uniform(2, 9, 3)
        base = np.stack([np.sin(a * yy + b * xx), np.cos(b * yy - c * xx), np.sin(c * (xx + yy))], -1) * 90 + 128
        out.append(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """What the trainer hands a reward: float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def _normalize(array01: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((array01 - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1).astype(np.float32))


def torchvision_pil_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """ImageReward's _transform on a PIL image: torchvision Resize(size, BICUBIC) (shorter side to size,
    longer to int(size * long / short)), CenterCrop (offset int(round(d / 2.0))), ToTensor, Normalize."""
    pil = Image.fromarray(image)
    w, h = pil.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    pil = pil.crop((left, top, left + size, top + size))
    return _normalize(np.asarray(pil) / 255.0)


def hps_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """HPSv2's preprocess_val: ToTensor, then ResizeMaxSize on the float tensor (round(dim * scale);
    bicubic with antialias, PIL's kernel, here PIL's float mode per channel), F.pad(fill=0), Normalize."""
    h, w = image.shape[:2]
    scale = size / float(max(h, w))
    x = image / 255.0
    if scale != 1.0:
        new_h, new_w = (round(dim * scale) for dim in (h, w))
        x = np.stack([np.asarray(Image.fromarray(x[..., c].astype(np.float32), mode="F").resize((new_w, new_h),
                                                                                             Image.BICUBIC))
                      for c in range(3)], -1).astype(np.float64)
        pad_h, pad_w = size - new_h, size - new_w
        x = np.pad(x, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    return _normalize(x)


def clip_processor_pixels(folder: Path, images: np.ndarray) -> torch.Tensor:
    """transformers' CLIPImageProcessor (its PIL backend; torchvision is not installable) from the folder."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(folder)
    return processor(images=[Image.fromarray(i) for i in images], return_tensors="pt").pixel_values


# --- reference forwards ------------------------------------------------------------------------------------
def laion_mlp(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """improved-aesthetic-predictor's (and ImageReward's) MLP class, loaded strictly from a state dict."""
    dims = [t.shape for k, t in state.items() if k.endswith("weight")]
    mlp = torch.nn.Sequential(torch.nn.Linear(dims[0][1], dims[0][0]), torch.nn.Dropout(0.2),
                              torch.nn.Linear(dims[1][1], dims[1][0]), torch.nn.Dropout(0.2),
                              torch.nn.Linear(dims[2][1], dims[2][0]), torch.nn.Dropout(0.1),
                              torch.nn.Linear(dims[3][1], dims[3][0]), torch.nn.Linear(dims[4][1], dims[4][0]))
    holder = torch.nn.Module()  # the MLP class keeps its Sequential as .layers
    holder.layers = mlp
    holder.load_state_dict(state, strict=True)
    return mlp.eval()


def _resblock(x: torch.Tensor, sd: dict, prefix: str, heads: int, mask) -> torch.Tensor:
    width = x.shape[-1]
    attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    attn.load_state_dict({k: sd[f"{prefix}attn.{k}"] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                                 "out_proj.bias")})
    ln = lambda t, n: F.layer_norm(t, (width,), sd[f"{prefix}{n}.weight"], sd[f"{prefix}{n}.bias"])  # noqa: E731
    h = ln(x, "ln_1")
    x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
    h = F.linear(F.gelu(F.linear(ln(x, "ln_2"), sd[f"{prefix}mlp.c_fc.weight"], sd[f"{prefix}mlp.c_fc.bias"])),
                 sd[f"{prefix}mlp.c_proj.weight"], sd[f"{prefix}mlp.c_proj.bias"])
    return x + h


@torch.no_grad()
def open_clip_score(checkpoint: Path, cfg: dict, pixels: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP(image, text) with normalised features, diagonal of image @ text.T (HPSv2's score)."""
    sd = torch.load(checkpoint, weights_only=True)["state_dict"]
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (v["width"],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(v["layers"]):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", v["width"] // v["head_width"], None)
    image = F.layer_norm(x[:, 0], (v["width"],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    length = t["context_length"]
    y = sd["token_embedding.weight"][token_ids] + sd["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(t["layers"]):
        y = _resblock(y, sd, f"transformer.resblocks.{i}.", t["heads"], causal)
    y = F.layer_norm(y, (t["width"],), sd["ln_final.weight"], sd["ln_final.bias"])
    text = y[torch.arange(y.shape[0]), token_ids.argmax(-1)] @ sd["text_projection"]
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


def open_clip_tokens(tokenizer, prompts: list[str], length: int = 77) -> torch.Tensor:
    """open_clip's tokenize layout: [sot, ..., eot] then zeros to the context length."""
    out = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, truncation=True, max_length=length).input_ids
        out[row, : len(ids)] = torch.tensor(ids)
    return out
