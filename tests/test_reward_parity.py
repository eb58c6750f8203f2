"""Every text-to-image reward loaded offline from a folder laid out as its publisher ships it scores as
the publisher's own inference code does (independent references in reward_fixtures), on square and
non-square images — or is refused with one line that names what is missing and the flag to give it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertTokenizer, CLIPModel

from cmalign.errors import UserError
from cmalign.rewards.registry import RewardContext, build_reward
from cmalign.rewards.text_to_image.preprocess import CLIP_STD, clip_processor, hps_processor, torchvision_pil
from lcm_fixtures import byte_level_clip_tokenizer
from reward_fixtures import (TINY_OPEN_CLIP, aesthetic_folder, as_tensor, clip_model, clip_processor_pixels,
                             clip_tokenizer_folder, hf_clip_folder, hps_folder, hps_pixels, image_reward_folders,
                             laion_mlp, open_clip_score, open_clip_tokens, torchvision_pil_pixels, uint8_images)

LCM_WORLD = SimpleNamespace(name="lcm")
PROMPTS = ["a red cat", "a blue dog on grass"]
# at the model's 32 px, square, and non-square ones whose resize truncates (40x61: 48 not 49) or whose
# crop offset is odd (40x59: floor 7 vs round 8), upsampled, and portrait
SHAPES = [(32, 32), (48, 48), (40, 61), (61, 40), (40, 59), (24, 36)]
ONE_LEVEL = 1.01 / 255 / min(CLIP_STD)  # one 8-bit step, normalised


def build(name, options):
    return build_reward(name, RewardContext(world=LCM_WORLD, options=options))


def features(output):
    return getattr(output, "pooler_output", output)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("publishers")
    pick_model, l14_model = clip_model(seed=3), clip_model(seed=4)
    hps, hps_model = hps_folder(root / "HPSv2")
    image_reward, bert, vision, text = image_reward_folders(root)
    return SimpleNamespace(
        root=root, pick=hf_clip_folder(root / "PickScore_v1", pick_model),
        pick_bare=hf_clip_folder(root / "PickScore_bare", pick_model, tokenizer=False, weights="bin"),
        l14=hf_clip_folder(root / "clip-vit-large-patch14", l14_model),
        vit_h_tokenizer=clip_tokenizer_folder(root / "CLIP-ViT-H-14-tokenizer"),
        hps=hps, aesthetic=aesthetic_folder(root / "improved-aesthetic-predictor"),
        image_reward=image_reward, bert=bert, vision=vision, text=text,
    )


def worst(scores, references):
    """The largest difference to the reference, after checking that the images matter at all (else
    equal scores would prove nothing about preprocessing)."""
    spread = torch.stack([s - s.mean() for s in references]).abs().max().item()
    changes = max((a - b).abs().max().item() for a, b in zip(references, references[1:]))
    assert spread > 1e-3 and changes > 1e-3, (spread, changes)
    return max((a - b).abs().max().item() for a, b in zip(scores, references))


def test_pickscore_equals_its_published_inference(zoo):
    reward = build("pickscore", {"pickscore": {"path": str(zoo.pick)}})
    model, tokenizer = CLIPModel.from_pretrained(zoo.pick).eval(), AutoTokenizer.from_pretrained(zoo.pick)
    ours, theirs = [], []
    for shape in SHAPES:
        images = uint8_images(shape)
        with torch.no_grad():  # PickScore's README, processor from the folder
            text = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = F.normalize(features(model.get_image_features(pixel_values=clip_processor_pixels(zoo.pick, images))), dim=-1)
            text_embs = F.normalize(features(model.get_text_features(**text)), dim=-1)
            theirs.append(model.logit_scale.exp() * (image_embs * text_embs).sum(-1))
        ours.append(reward(as_tensor(images), PROMPTS))
    assert worst(ours, theirs) < 1e-4
    # prompts matter: the same images under swapped prompts score differently
    images = as_tensor(uint8_images((40, 61)))
    assert (reward(images, PROMPTS) - reward(images, PROMPTS[::-1])).abs().min() > 1e-3


def test_pickscore_folder_without_tokenizer_is_refused_then_takes_one(zoo):
    with pytest.raises(UserError) as info:
        build("pickscore", {"pickscore": {"path": str(zoo.pick_bare)}})
    message = str(info.value)
    assert "has no tokenizer files" in message and "--reward-paths pickscore.tokenizer=PATH" in message
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message and "\n" not in message
    # the published weights as pytorch_model.bin, the tokenizer from its own folder
    bare = build("pickscore", {"pickscore": {"path": str(zoo.pick_bare), "tokenizer": str(zoo.vit_h_tokenizer)}})
    full = build("pickscore", {"pickscore": {"path": str(zoo.pick)}})
    images = as_tensor(uint8_images((40, 59)))
    assert torch.allclose(bare(images, PROMPTS), full(images, PROMPTS), atol=1e-5)


def test_tokenizers_that_do_not_fit_are_refused(zoo, tmp_path):
    import json

    # a CLIP vocabulary with one token too many
    extra = tmp_path / "extra"
    tokenizer = byte_level_clip_tokenizer(tmp_path / "build")
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(extra)
    with pytest.raises(UserError, match=r"515 tokens, the text tower has 514 embedding rows.*pickscore\.tokenizer=PATH"):
        build("pickscore", {"pickscore": {"path": str(zoo.pick_bare), "tokenizer": str(extra)}})
    # a CLIP tokenizer whose end-of-text is not the id the text tower pools at
    vocab = json.loads((tmp_path / "build" / "vocab.json").read_text())
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    first = next(t for t, i in vocab.items() if i == 0)
    vocab[first], vocab["<|endoftext|>"] = vocab["<|endoftext|>"], 0
    (swapped / "vocab.json").write_text(json.dumps(vocab))
    (swapped / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match=r"eos token id 0 where the checkpoint uses 513"):
        build("pickscore", {"pickscore": {"path": str(zoo.pick_bare), "tokenizer": str(swapped)}})
    # ImageReward: a BERT tokenizer of only its special tokens (the 5-token vocabulary)
    specials = tmp_path / "specials"
    specials.mkdir()
    (specials / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(UserError, match=r"7 tokens, the text tower has 46 embedding rows.*image_reward\.tokenizer=PATH"):
        build("image_reward", {"image_reward": {"path": str(zoo.image_reward), "tokenizer": str(specials)}})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"has no tokenizer files; give bert-base-uncased's tokenizer files \(google-bert"
                                        r"/bert-base-uncased: vocab\.txt, or tokenizer\.json\) with --reward-paths "
                                        r"image_reward\.tokenizer=PATH"):
        build("image_reward", {"image_reward": {"path": str(zoo.image_reward), "tokenizer": str(empty)}})


def test_hpsv2_equals_its_published_inference(zoo):
    options = {"path": str(zoo.hps), "architecture": str(zoo.hps / "ViT-tiny.json"), "tokenizer": str(zoo.vit_h_tokenizer)}
    reward = build("hpsv2", {"hpsv2": options})
    tokenizer = AutoTokenizer.from_pretrained(zoo.vit_h_tokenizer)
    ours, theirs = [], []
    for shape in SHAPES:
        images = uint8_images(shape)
        pixels = torch.stack([hps_pixels(i, 32) for i in images])
        theirs.append(open_clip_score(zoo.hps / "HPS_v2_compressed.pt", TINY_OPEN_CLIP, pixels,
                                      open_clip_tokens(tokenizer, PROMPTS)))
        ours.append(reward(as_tensor(images), PROMPTS))
    assert worst(ours, theirs) < 1e-4
    v21 = build("hpsv2_1", {"hpsv2_1": options})
    images = uint8_images((61, 40))
    reference = open_clip_score(zoo.hps / "HPS_v2.1_compressed.pt", TINY_OPEN_CLIP,
                                torch.stack([hps_pixels(i, 32) for i in images]), open_clip_tokens(tokenizer, PROMPTS))
    assert (v21(as_tensor(images), PROMPTS) - reference).abs().max() < 1e-4


def test_aesthetic_equals_laion_predictor_on_clip_l14(zoo):
    reward = build("aesthetic", {"aesthetic": {"path": str(zoo.aesthetic), "clip": str(zoo.l14)}})
    model = CLIPModel.from_pretrained(zoo.l14).eval()
    mlp = laion_mlp(torch.load(zoo.aesthetic / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True))
    ours, theirs = [], []
    for shape in SHAPES:
        images = uint8_images(shape)
        with torch.no_grad():
            embedding = features(model.get_image_features(pixel_values=clip_processor_pixels(zoo.l14, images)))
            theirs.append(mlp(F.normalize(embedding, dim=-1)).squeeze(-1))
        ours.append(reward(as_tensor(images), PROMPTS))
    assert worst(ours, theirs) < 1e-4


def test_image_reward_equals_its_published_inference(zoo):
    reward = build("image_reward", {"image_reward": {"path": str(zoo.image_reward), "tokenizer": str(zoo.bert)}})
    tokenizer = BertTokenizer.from_pretrained(zoo.bert)  # BLIP's init_tokenizer
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    state = torch.load(zoo.image_reward / "ImageReward.pt", weights_only=True)
    mlp = laion_mlp({k[4:]: v for k, v in state.items() if k.startswith("mlp.")})  # ImageReward's MLP: mlp.layers.N
    ours, theirs = [], []
    for shape in SHAPES:
        images = uint8_images(shape)
        with torch.no_grad():
            pixels = torch.stack([torchvision_pil_pixels(i, 32) for i in images])
            image_embeds = zoo.vision(pixel_values=pixels).last_hidden_state
            text = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            states = zoo.text(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long)).last_hidden_state
            theirs.append(((mlp(states[:, 0]) - 0.16717362830052426) / 1.0333394966054072).squeeze(-1))
        ours.append(reward(as_tensor(images), PROMPTS))
    assert worst(ours, theirs) < 1e-4
    images = as_tensor(uint8_images((40, 61)))
    assert (reward(images, PROMPTS) - reward(images, PROMPTS[::-1])).abs().min() > 1e-3


def test_preprocessing_matches_the_publishers_pixel_for_pixel(zoo):
    for shape in SHAPES:
        images = uint8_images(shape, seed=5)
        x = as_tensor(images)
        clip_ref = clip_processor_pixels(zoo.l14, images)
        assert (clip_processor(32)(x) - clip_ref).abs().max() <= ONE_LEVEL
        tv_ref = torch.stack([torchvision_pil_pixels(i, 32) for i in images])
        assert (torchvision_pil(32)(x) - tv_ref).abs().max() <= ONE_LEVEL
        assert (hps_processor(32)(x) - torch.stack([hps_pixels(i, 32) for i in images])).abs().max() < 1e-5
    # the truncation and the two crop conventions are real differences on these shapes
    assert clip_processor(224).geometry(384, 512)[0] == (224, 298)
    assert clip_processor(32).geometry(40, 59)[1][2] == 7 and torchvision_pil(32).geometry(40, 59)[1][2] == 8
    assert hps_processor(224).geometry(384, 512) == ((168, 224), (-28, -28, 0, 0))


def test_preprocessing_keeps_the_gradient():
    # every pixel that reaches the model gets a gradient (a crop drops the sides, so a square input there)
    for preprocess, shape in ((clip_processor(32), (40, 40)), (torchvision_pil(32), (40, 40)), (hps_processor(32), (40, 61))):
        x = torch.rand(2, 3, *shape, requires_grad=True)
        out = preprocess(x)
        assert out.shape == (2, 3, 32, 32)
        out.square().sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad != 0).float().mean() > 0.9


def test_missing_local_paths_and_offline_hub_ids_say_which_flag(zoo, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cases = [
        ("pickscore", {"path": "/models/pick"}, "no such file or folder: /models/pick", "--reward-paths pickscore=PATH"),
        ("hpsv2", {"path": str(tmp_path / "nothing" / "hps")}, "no such file or folder", "--reward-paths hpsv2=PATH"),
        ("aesthetic", {"path": str(zoo.aesthetic), "clip": "./clip-l14"}, "no such file or folder: ./clip-l14",
         "--reward-paths aesthetic.clip=PATH"),
        ("image_reward", {"path": str(zoo.image_reward), "config": "/m/med_config.json"}, "no such file or folder",
         "--reward-paths image_reward.config=PATH"),
        # nothing cached: the default tokenizers' hub ids cannot load offline
        ("image_reward", {"path": str(zoo.image_reward)}, "google-bert/bert-base-uncased (a hub id, not cached",
         "--reward-paths image_reward.tokenizer=PATH"),
        ("hpsv2", {"path": str(zoo.hps), "architecture": str(zoo.hps / "ViT-tiny.json")},
         "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "--reward-paths hpsv2.tokenizer=PATH"),
        ("clip_score", {}, "'openai/clip-vit-large-patch14'", "--reward-paths clip_score=PATH"),
    ]
    for name, options, what, hint in cases:
        with pytest.raises(UserError) as info:
            build(name, {name: options})
        message = str(info.value)
        assert what in message and hint in message and "\n" not in message, message
        assert "from the Hugging Face hub" not in message or "HF_HUB_OFFLINE is set" in message


def test_built_in_architecture_is_open_clip_vit_h14():
    """The default HPSv2 architecture has exactly the tensors of open_clip's ViT-H-14 (shapes written out
    here from open_clip's VisionTransformer / TextTransformer), and its head counts (1280 / 80, 16)."""
    from cmalign.rewards.text_to_image.clip import OPEN_CLIP_VIT_H14, open_clip_config, open_clip_to_transformers

    shapes = {"logit_scale": (), "token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
              "ln_final.weight": (1024,), "ln_final.bias": (1024,), "text_projection": (1024, 1024),
              "visual.class_embedding": (1280,), "visual.positional_embedding": (257, 1280),
              "visual.conv1.weight": (1280, 3, 14, 14), "visual.proj": (1280, 1024)}
    for name in ("visual.ln_pre", "visual.ln_post"):
        shapes.update({f"{name}.weight": (1280,), f"{name}.bias": (1280,)})
    for tower, width, layers in (("", 1024, 24), ("visual.", 1280, 32)):
        for i in range(layers):
            p = f"{tower}transformer.resblocks.{i}."
            shapes.update({f"{p}attn.in_proj_weight": (3 * width, width), f"{p}attn.in_proj_bias": (3 * width,),
                           f"{p}attn.out_proj.weight": (width, width), f"{p}attn.out_proj.bias": (width,),
                           f"{p}mlp.c_fc.weight": (4 * width, width), f"{p}mlp.c_fc.bias": (4 * width,),
                           f"{p}mlp.c_proj.weight": (width, 4 * width), f"{p}mlp.c_proj.bias": (width,)})
            for ln in ("ln_1", "ln_2"):
                shapes.update({f"{p}{ln}.weight": (width,), f"{p}{ln}.bias": (width,)})
    mapped = open_clip_to_transformers({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    config = open_clip_config(OPEN_CLIP_VIT_H14)
    with torch.device("meta"):
        model = CLIPModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    assert config.vision_config.num_attention_heads == 16 and config.text_config.num_attention_heads == 16
    assert config.vision_config.hidden_act == config.text_config.hidden_act == "gelu"  # ViT-H-14: not quick_gelu


def test_clip_score_and_aesthetic_share_one_clip_model(zoo):
    clip = build("clip_score", {"clip_score": {"path": str(zoo.l14)}})
    aesthetic = build("aesthetic", {"aesthetic": {"path": str(zoo.aesthetic), "clip": str(zoo.l14)}})
    assert clip.embedder.model is aesthetic.embedder.model and aesthetic.embedder.tokenizer is None
