"""A transformer consistency model in the lcm world (issue 12 item 3): PixArt-LCM (PixArtAlphaPipeline +
LCMScheduler + PixArtTransformer2DModel + T5) on tiny random pipelines saved with save_pretrained, with a
T5 tokenizer built offline (transformers' T5Tokenizer on a small Unigram vocabulary). Our chain equals the
stock pipeline; LoRA on the transformer's attention through peft trains from the CLI; the exported peft
adapter loads into the stock pipeline's transformer with PeftModel.from_pretrained and reproduces our
samples; an export that would not land is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from cmalign.chain import ChainNoise, run_chain
from cmalign.cli import main
from cmalign.config import TrainConfig
from cmalign.errors import UserError
from cmalign.training.build import build_world
from cmalign.worlds.lcm.family import model_family
from cmalign.worlds.lcm.lora import OUR_ADAPTER, PEFT_ADAPTER_FILE, check_peft_adapter_loads_completely
from cmalign.worlds.lcm.pixart import PixArtLCMWorld
from lcm_fixtures import TINY_VAE, lcm_scheduler, perturb_lora_b, tiny_clip, world_kwargs

PROMPTS = ["a red cat", "a dog on the grass"]
WORDS = ["a", "red", "cat", "dog", "on", "the", "grass", "photo", "of", "blue"]
# PixArt-alpha 512 / 256 (no micro-conditions) and 1024 (sample_size 128: resolution and aspect ratio)
TINY_TRANSFORMER = dict(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                        cross_attention_dim=24, sample_size=16, patch_size=2, caption_channels=32)  # width 24: the micro-
# conditions embed resolution (2 x 8) and aspect ratio (8) into thirds of it
# 8 x 8 tokens of a 128 x 128 latent; the VAE without its mid-block attention (16k tokens at 128 x 128)
MICRO = dict(sample_size=128, patch_size=16, vae_attention=False)


def t5_tokenizer(folder) -> T5Tokenizer:
    """A T5 tokenizer without sentencepiece: <pad> 0, </s> 1, <unk> 2, the word pieces, single letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def pixart_components(folder, seed: int = 0, vae_attention: bool = True, **transformer) -> dict:
    tokenizer = t5_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    # PixArt-LCM's scheduler: LCMScheduler on PixArt's linear betas
    scheduler = lcm_scheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=AutoencoderKL(**TINY_VAE, mid_block_add_attention=vae_attention),
                transformer=PixArtTransformer2DModel(**{**TINY_TRANSFORMER, **transformer}), scheduler=scheduler)


def save_pixart(folder, **transformer):
    PixArtAlphaPipeline(**pixart_components(folder / "build", **transformer)).save_pretrained(folder / "model")
    return folder / "model"


def stock(model, adapter=None):
    pipe = PixArtAlphaPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:  # diffusers 0.42 has no PixArt LoRA loader: peft's own
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, adapter)
    return pipe


def stock_call(pipe, num_steps, guidance, resolution, output_type="pt", seed=3, prompts=PROMPTS):
    # binning off: at tiny sizes the pipeline's aspect-ratio bins (256..1024 px) are not the identity
    return pipe(prompts, num_inference_steps=num_steps, guidance_scale=guidance, height=resolution, width=resolution,
                generator=[torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list) else  # per image
                torch.Generator().manual_seed(seed), output_type=output_type, use_resolution_binning=False,
                clean_caption=False).images


def ours(world, num_steps, seed=3):
    noise = ChainNoise.draw(len(PROMPTS), world.latent_shape, num_steps, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x0 = run_chain(world, world.encode_prompts(PROMPTS), noise, world.timesteps(num_steps)).x0
        return x0, world.decode(x0).clamp(0, 1)


def cfg_for(model, **lcm) -> TrainConfig:
    return TrainConfig(world="lcm", lora_rank=4, lora_alpha=8.0, **{"lcm.model": str(model)},
                       **{"lcm.guidance_scale": lcm.pop("lcm.guidance_scale", 0.0)}, **lcm)


@pytest.mark.parametrize("transformer, guidance, steps", [({}, 0.0, (1, 4)), (MICRO, 1.5, (2,))],
                         ids=["pixart-lcm-512-like", "1024-like-micro-conditions-cfg"])
def test_pixart_lcm_chain_from_a_saved_folder_equals_the_stock_pipeline(tmp_path, transformer, guidance, steps):
    model = save_pixart(tmp_path, **transformer)
    assert model_family(str(model)) == "pixart"
    native = transformer.get("sample_size", TINY_TRANSFORMER["sample_size"]) * 2  # the tiny VAE downsamples by 2
    world = build_world(cfg_for(model, **{"lcm.guidance_scale": guidance}, **{"lcm.resolution": native}))
    assert isinstance(world, PixArtLCMWorld) and world.learned_sigma
    assert world.classifier_free == (guidance > 1) and (world._micro is not None) == bool(transformer)
    resolution = world.resolution
    pipe = stock(model)
    for num_steps in steps:
        x0, images = ours(world, num_steps)
        latents = stock_call(pipe, num_steps, guidance, resolution, "latent")
        # latents reach |x| ~ 700 with random weights (eps-prediction at abar ~ 4e-5): relative float32 rounding
        assert float((x0 - latents).abs().max() / latents.abs().max()) < 1e-6
        assert (images - stock_call(pipe, num_steps, guidance, resolution)).abs().max() < 1e-5


def test_pixart_family_is_read_from_model_index_and_unet_lora_tcd_are_refused(tmp_path):
    folder = tmp_path / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    assert model_family(str(folder)) == "pixart"  # from the index alone, before any weights
    with pytest.raises(UserError, match="--lcm.unet applies to the UNet families"):
        build_world(cfg_for(folder, **{"lcm.unet": str(tmp_path / "some_unet")}))
    with pytest.raises(UserError, match="--lcm.unet and --lcm.lora apply to the UNet families"):
        build_world(cfg_for(folder, **{"lcm.lora": str(tmp_path / "some_lora")}))
    sigma = tmp_path / "sigma"
    sigma.mkdir()
    (sigma / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(UserError, match="PixArtSigmaPipeline pipeline; the lcm world runs"):
        model_family(str(sigma))
    components = pixart_components(tmp_path / "build")
    with pytest.raises(UserError, match="lcm.scheduler tcd is not supported for PixArt"):
        PixArtLCMWorld(**components, **world_kwargs(chain_scheduler="tcd"))
    with pytest.raises(UserError, match="resolution must be a multiple of 4"):
        PixArtLCMWorld(**components, **world_kwargs(resolution=34, lora_rank=None))
    with pytest.raises(UserError, match="the T5 tokenizer has 4 tokens for a text encoder of 40"):
        PixArtLCMWorld(**dict(components, tokenizer=T5Tokenizer(extra_ids=0)), **world_kwargs(lora_rank=None))  # an unconverted one


def test_cli_trains_lora_on_the_transformer_and_the_export_loads_into_the_stock_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = save_pixart(tmp_path)
    for config, key in ((model / "model_index.json", "transformer"), (model / "transformer" / "config.json", None)):
        data = json.loads(config.read_text())  # the hub repository's legacy class name, as PixArt-LCM's
        data.update({key: ["diffusers", "Transformer2DModel"]} if key else {"_class_name": "Transformer2DModel"})
        config.write_text(json.dumps(data))
    clip, _ = tiny_clip(tmp_path / "clip")
    run = tmp_path / "run"
    tiny = ["--lora-rank", "4", "--lora-alpha", "8", "--num-steps", "2", "--batch-size", "1", "--steps", "2",
            "--eval-every", "100", "--eval-size", "1", "--final-eval-size", "1", "--grid-every", "100",
            "--checkpoint-every", "100", "--report-to", "none", "--device", "cpu", "--threads", "1", "--mixed-precision", "no"]
    code = main(["train", "--world", "lcm", "--lcm.model", str(model), "--lcm.resolution", "32", "--lcm.guidance-scale", "0",
                 "--prompts", "a red cat", "--eval-prompts", "a dog", "--reward-weights", "clip_score=1.0",
                 "--reward-paths", f"clip_score={clip}", "--beta", "0.1", "--lr", "0.05", "--output-dir", str(run),
                 *tiny])
    assert code == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)
    exported = load_file(run / "adapter" / PEFT_ADAPTER_FILE)
    # LoRA on the attention projections of every block (self and cross attention), and training moved it
    assert len(exported) == 2 * 2 * 2 * 4 and all(k.startswith("base_model.model.transformer_blocks.") for k in exported)
    assert {k.split(".")[4] for k in exported} == {"attn1", "attn2"}
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in exported.items())

    assert main(["sample", "--run", str(run), "--prompts", "a red cat", "a dog", "--num-per-prompt", "1",
                 "--seed", "5", "--out", str(tmp_path / "samples")]) == 0
    samples = torch.from_numpy(np.load(tmp_path / "samples" / "samples.npz")["images"])
    pipe = stock(model, adapter=run / "adapter")
    landed = {n.replace(".default.", "."): p for n, p in pipe.transformer.named_parameters() if ".lora_" in n}
    assert landed.keys() == exported.keys() and all(torch.equal(landed[k], exported[k]) for k in exported)
    with torch.no_grad():
        reference = stock_call(pipe, 2, 0.0, 32, seed=[5, 6], prompts=["a red cat", "a dog"])
    assert (samples - reference).abs().max() < 1e-5
    with pipe.transformer.disable_adapter(), torch.no_grad():  # the adapter is visible: equality means something
        base = stock_call(pipe, 2, 0.0, 32, seed=[5, 6], prompts=["a red cat", "a dog"])
    assert (samples - base).abs().max() > 1e-4


def test_an_export_that_would_not_land_is_refused_and_a_resumed_adapter_is_the_same(tmp_path):
    world = PixArtLCMWorld(**pixart_components(tmp_path / "build"), **world_kwargs(lora_rank=4, lora_alpha=8.0, guidance_scale=0.0))
    perturb_lora_b(world.network, OUR_ADAPTER, std=0.05)
    world.save_adapter(tmp_path / "adapter")
    again = PixArtLCMWorld(**pixart_components(tmp_path / "build"), **world_kwargs(lora_rank=None, guidance_scale=0.0))
    again.load_adapter(tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(world.adapter_state_dict().values(), again.adapter_state_dict().values()))
    # peft's bare key names (without base_model.model.) would not land through PeftModel.from_pretrained
    bare = tmp_path / "bare"
    world.adapter_config().save_pretrained(bare)
    save_file({k: v.contiguous() for k, v in world.adapter_state_dict().items()}, bare / PEFT_ADAPTER_FILE)
    with pytest.raises(UserError, match=r"would load incompletely .*: 0 of 32 tensors land") as info:
        check_peft_adapter_loads_completely(world.network, OUR_ADAPTER, bare)
    assert "\n" not in str(info.value)


def test_pixart_lcm_preset_says_what_it_runs():
    from cmalign.config import load_preset, validate

    cfg = validate(load_preset("pixart-lcm-xl-2-1024"), check_rewards=False)
    lcm = cfg.lcm
    assert (cfg.world, lcm.model, cfg.num_steps, lcm.guidance_scale, lcm.resolution, lcm.vae_checkpointing) == (
        "lcm", "PixArt-alpha/PixArt-LCM-XL-2-1024-MS", 4, 0.0, 1024, True)
