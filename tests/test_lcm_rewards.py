"""The text-to-image reward zoo on tiny random-weight models saved in the publishers' formats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cmalign.errors import UserError
from cmalign.rewards.registry import RewardContext, available, build_reward
from cmalign.rewards.text_to_image.clip import CLIPEmbedder
from cmalign.rewards.text_to_image.preprocess import CLIP_MEAN, CLIP_STD, clip_processor, hps_processor
from lcm_fixtures import linear_head_tensors, tiny_clip, write_image_reward, write_open_clip_checkpoint
from reward_fixtures import unique_vocab

LCM_WORLD = SimpleNamespace(name="lcm")
PROMPTS = ["a red cat", "a blue dog on grass", "a red cat"]
DIFFERENTIABLE = ("clip_score", "pickscore", "hpsv2", "hpsv2_1", "aesthetic", "image_reward")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Reward name -> its options ({"path": ...}), all tiny and offline, plus the tiny CLIPModel."""
    root = tmp_path_factory.mktemp("rewards")
    clip_folder, clip_model = tiny_clip(root / "clip")
    write_open_clip_checkpoint(clip_model, root / "HPS_v2_compressed.pt")
    write_open_clip_checkpoint(clip_model, root / "HPS_v2.1_compressed.pt")
    torch.save(linear_head_tensors((16, 32, 8, 4, 2, 1)), root / "aesthetic-model.pth")
    image_reward_folder, vision, text = write_image_reward(root / "image_reward")
    unique_vocab(image_reward_folder / "vocab.txt")  # its vocab.txt lists "a" twice: refused as it is
    hps = {"path": str(root), "architecture": str(clip_folder)}
    options = {
        "clip_score": {"path": str(clip_folder)},
        "pickscore": {"path": str(clip_folder)},
        "hpsv2": hps,
        "hpsv2_1": hps,
        "aesthetic": {"path": str(root / "aesthetic-model.pth"), "clip": str(clip_folder)},
        "image_reward": {"path": str(image_reward_folder)},
    }
    return SimpleNamespace(options=options, clip=clip_model, vision=vision, text=text)


def build(name, options):
    return build_reward(name, RewardContext(world=LCM_WORLD, options=options))


def images(batch: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Non-square and not at the models' resolution, so that resizing and cropping are exercised."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size + 8, generator=generator).requires_grad_(True)


def test_registry_lists_the_zoo_for_the_lcm_world():
    assert set(DIFFERENTIABLE) | {"jpeg_compressibility", "jpeg_incompressibility"} <= set(available("lcm"))
    assert "clip_score" not in available("digits")


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_differentiable_reward_gives_finite_nonzero_image_gradient(weights, name):
    reward = build(name, weights.options)
    assert reward.differentiable and not reward.eval_only
    x = images()
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_open_clip_checkpoint_maps_onto_the_same_clip_model(weights):
    reward = build("hpsv2", weights.options)
    loaded = reward.embedder.model.state_dict()
    original = weights.clip.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    # HPS is the plain cosine of the HF model's own embeddings, on HPSv2's padded images
    reference = CLIPEmbedder(weights.clip, reward.embedder.tokenizer, "cpu", torch.float32, hps_processor(32))
    x = images().detach()
    assert torch.allclose(reward(x, PROMPTS), reference.cosine(x, PROMPTS), atol=1e-6)


def test_image_reward_checkpoint_maps_onto_blip(weights):
    reward = build("image_reward", weights.options)
    for loaded, original in ((reward.vision, weights.vision), (reward.text, weights.text)):
        state, expected = loaded.state_dict(), original.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert reward.vision.config.layer_norm_eps == 1e-6 and reward.image_size == 32
    ids, mask = reward._tokenize(["a red cat"])
    assert ids.shape == (1, 35) and ids[0, 0] == reward.tokenizer.cls_token_id and mask.sum() == 5  # [CLS] a red cat [SEP]


def test_pickscore_scales_by_clip_logit_scale_and_aesthetic_ignores_prompts(weights):
    pick, clip = build("pickscore", weights.options), build("clip_score", weights.options)
    x = images().detach()
    assert torch.allclose(pick(x, PROMPTS), weights.clip.logit_scale.exp() * clip(x, PROMPTS), atol=1e-5)
    aesthetic = build("aesthetic", weights.options)
    assert torch.equal(aesthetic(x, PROMPTS), aesthetic(x, ["something else"] * 3))


def test_preprocessing_is_tensor_side_and_exact_at_model_size():
    x = (torch.rand(2, 3, 32, 32) * 255).round() / 255  # on the 8-bit grid, at the model's size: untouched
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(clip_processor(32)(x) * std + mean, x, atol=1e-6)
    wide = (torch.rand(1, 3, 32, 48) * 255).round() / 255
    assert torch.allclose(clip_processor(32)(wide) * std + mean, wide[..., 8:40], atol=1e-6)
    tall = (torch.rand(1, 3, 32, 20) * 255).round() / 255
    padded = hps_processor(32)(tall) * std + mean  # longer side already 32: not resized, padded with black
    assert torch.allclose(padded[..., 6:26], tall, atol=1e-6)
    assert padded[..., :6].abs().max() < 1e-6 and padded[..., 26:].abs().max() < 1e-6
    pixels = clip_processor(32)(torch.rand(2, 3, 64, 80, requires_grad=True), torch.float32)
    assert pixels.shape == (2, 3, 32, 32) and pixels.requires_grad


def test_jpeg_rewards_are_not_differentiable_and_rank_by_size():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = torch.cat([flat, noisy])
    compressibility = build("jpeg_compressibility", {})
    incompressibility = build("jpeg_incompressibility", {})
    assert not compressibility.differentiable and not incompressibility.differentiable
    c, i = compressibility(batch, ["x", "y"]), incompressibility(batch, ["x", "y"])
    assert c[0] > c[1] and i[1] > i[0] and torch.equal(c, -i) and (i > 0).all()


def test_reward_loading_errors_are_one_line(weights, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        build("pickscore", {})  # the default hub id, unreachable offline
    assert "yuvalkirstain/PickScore_v1" in str(info.value) and "HF_HUB_OFFLINE=1" in str(info.value)
    with pytest.raises(UserError, match="unknown option"):
        build("clip_score", {"clip_score": {"pth": "x"}})
    with pytest.raises(UserError, match="has no HPS_v2_compressed.pt"):
        build("hpsv2", {"hpsv2": {"path": str(tmp_path), "architecture": weights.options["hpsv2"]["architecture"]}})
    (tmp_path / "pickled.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable tensor checkpoint"):
        build("aesthetic", {"aesthetic": {"path": str(tmp_path / "pickled.pth"),
                                          "clip": weights.options["aesthetic"]["clip"]}})
