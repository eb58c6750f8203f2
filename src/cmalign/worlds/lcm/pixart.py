"""A transformer consistency model in the lcm world (issue 12): PixArt-LCM (PixArtAlphaPipeline with
LCMScheduler, PixArtTransformer2DModel, T5 text encoder), e.g. PixArt-alpha/PixArt-LCM-XL-2-1024-MS.

The chain is the LCM chain of the UNet families (chain.ConsistencyTransition on the scheduler's own abar
table and grid); only the network call differs, and it follows PixArtAlphaPipeline.__call__:
- text: the pipeline's own encode_prompt (T5 hidden states and their attention mask, padded to
  max_sequence_length 120, clean_caption off), computed once per prompt;
- micro-conditions: resolution (h, w) and aspect ratio h / w when the transformer's sample_size is 128
  (PixArt-alpha 1024), none otherwise (512, 256), exactly the pipeline's test;
- guidance: no guidance embedding; classifier-free guidance with the empty prompt when guidance_scale > 1
  (the pipeline's do_classifier_free_guidance); PixArt-LCM's card samples with guidance_scale 0;
- learned sigma: a transformer with 2 x in_channels outputs (PixArt's 8) keeps the first half.
The stock pipeline's use_resolution_binning is the identity at the model's native square size (1024 for
sample_size 128, 512 for 64); at other sizes ours equals the pipeline called with use_resolution_binning=False.

LoRA: PixArtTransformer2DModel has no diffusers adapter mixin and diffusers 0.42 has no PixArt LoRA loader,
so the adapter goes on through peft itself (inject_adapter_in_model) and is exported as a peft adapter
(adapter_model.safetensors + adapter_config.json) that `PeftModel.from_pretrained(pipe.transformer, DIR)`
loads into the stock pipeline's transformer; the export is checked to load completely that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import warnings

import torch
from diffusers import LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import save_file

from cmalign.errors import UserError
from cmalign.hub import hub_errors, offline
from cmalign.precision import WEIGHT_DTYPES
from cmalign.worlds.lcm.unet import DEFAULT_LORA_TARGETS, OUR_ADAPTER, PEFT_ADAPTER_FILE, LCMWorld, lora_layout
from cmalign.worlds.base import model_class

__all__ = ["PixArtLCMWorld", "PixArtConditioning", "load_pixart_components", "check_peft_adapter_loads_completely"]

MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's default (PixArt-alpha was trained with 120 T5 tokens)
MICRO_CONDITION_SAMPLE_SIZE = 128  # the pipeline passes resolution / aspect_ratio only at this sample_size
PEFT_PREFIX = "base_model.model."  # PeftModel's key names (PeftModel.save_pretrained / from_pretrained)


@dataclass
class PixArtConditioning:
    """What the transformer is conditioned on for a batch of prompts."""

    text: torch.Tensor  # (B, L, D) T5 hidden states
    mask: torch.Tensor  # (B, L) their attention mask
    uncond: torch.Tensor | None = None  # empty-prompt states when classifier-free guidance runs
    uncond_mask: torch.Tensor | None = None
    resolution: torch.Tensor | None = None  # (B, 2) (h, w): sample_size 128 only
    aspect_ratio: torch.Tensor | None = None  # (B, 1) h / w


class PixArtLCMWorld(LCMWorld):
    """The lcm world on a PixArt-LCM pipeline; everything but the network call, the text encoding and the
    adapter's attachment and export is LCMWorld's (decode, timesteps, reference policy, load_adapter)."""

    family = "pixart"
    base_adapter = None  # no stacked LCM-LoRA on this family
    classifier_free = False

    def __init__(self, transformer: PixArtTransformer2DModel, vae, text_encoder, tokenizer, scheduler, *,
                 device: str | torch.device = "cpu", resolution: int | None = None, guidance_scale: float = 0.0,
                 mixed_precision: str = "no", lora_rank: int | None = 8, lora_alpha: float = 8.0,
                 lora_targets=DEFAULT_LORA_TARGETS, lora_init: bool | str = True, heldout_fraction: float = 0.2,
                 chain_scheduler: str = "lcm", vae_checkpointing: bool = False,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, **ignored):
        if mixed_precision not in WEIGHT_DTYPES:
            raise UserError(f"mixed_precision must be one of {', '.join(WEIGHT_DTYPES)}, got {mixed_precision!r}")
        if chain_scheduler != "lcm":
            # PixArtAlphaPipeline returns the scheduler's second output at K = 1, which is not TCD's chain output
            raise UserError(f"lcm.scheduler {chain_scheduler} is not supported for PixArt pipelines (lcm only)")
        vocab = int(text_encoder.config.vocab_size)
        if not vocab // 2 <= len(tokenizer) <= vocab:
            # e.g. a sentencepiece spiece.model that transformers could not convert (no sentencepiece/protobuf)
            # leaves a near-empty vocabulary: every word would encode to <unk>
            raise UserError(f"the T5 tokenizer has {len(tokenizer)} tokens for a text encoder of {vocab}: it does not "
                            "belong to it (a spiece.model needs `pip install sentencepiece protobuf` to be converted)")
        self.device = torch.device(device)
        self.weight_dtype = WEIGHT_DTYPES[mixed_precision]
        self.autocast_dtype = None if self.weight_dtype == torch.float32 else self.weight_dtype
        self.dtype = torch.float32
        self.vae_upcast = self.weight_dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        # T5 overflows in float16: it stays in float32 then (it runs once per prompt)
        self.text_dtype = torch.float32 if self.weight_dtype == torch.float16 else self.weight_dtype
        for module, dtype in ((transformer, self.weight_dtype), (text_encoder, self.text_dtype),
                              (vae, torch.float32 if self.vae_upcast else self.weight_dtype)):
            module.requires_grad_(False).eval().to(self.device)
            if module.dtype != dtype:
                module.to(dtype=dtype)
        if vae_checkpointing:
            vae.enable_gradient_checkpointing()

        if not isinstance(scheduler, LCMScheduler):
            scheduler = LCMScheduler.from_config(scheduler.config)
        if getattr(scheduler.config, "thresholding", False) or getattr(scheduler.config, "clip_sample", False):
            raise UserError("the lcm scheduler clips or thresholds x0, which the differentiable chain does not do; "
                            "set clip_sample and thresholding to false in its scheduler config")
        self.scheduler, self.chain_scheduler, self.transition = scheduler, "lcm", None
        self.pipeline = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                            transformer=transformer, scheduler=scheduler)
        self.pipeline.set_progress_bar_config(disable=True)
        self.network, self.vae = transformer, vae
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64).to(self.device)
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.original_inference_steps = scheduler.config.original_inference_steps
        self.timestep_scaling = float(getattr(scheduler.config, "timestep_scaling", 10.0))

        config = transformer.config
        scale = self.pipeline.vae_scale_factor
        self.resolution = resolution or config.sample_size * scale
        if self.resolution % (scale * config.patch_size):
            raise UserError(f"resolution must be a multiple of {scale * config.patch_size} (the VAE's downsampling "
                            f"{scale} times the transformer's patch size {config.patch_size}), got {self.resolution}")
        side = self.resolution // scale
        self.latent_shape = (config.in_channels, side, side)
        self.learned_sigma = config.out_channels // 2 == config.in_channels  # as the pipeline tests it

        self.guidance_scale = guidance_scale
        self.classifier_free = guidance_scale > 1.0  # the pipeline's do_classifier_free_guidance
        self.max_sequence_length = int(max_sequence_length)
        self._micro = None
        if config.sample_size == MICRO_CONDITION_SAMPLE_SIZE:
            size = float(self.resolution)
            self._micro = (torch.tensor([[size, size]], device=self.device), torch.tensor([[1.0]], device=self.device))
        self.heldout_fraction = heldout_fraction
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._timesteps: dict[int, list[int]] = {}
        self.has_adapter = False
        if lora_rank is not None:
            self._attach_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(lora_targets),
                                            init_lora_weights=lora_init))

    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> "PixArtLCMWorld":
        if transition is not None:
            raise UserError(f"{cfg.method} needs a diffusion model's DDIM chain; the lcm world samples consistency "
                            "(lcm, tcd) chains only")
        cls.check_config(cfg)
        lcm = cfg.lcm
        if lcm.unet or lcm.lora:
            raise UserError(f"{lcm.model} is a PixArt pipeline: --lcm.unet and --lcm.lora apply to the UNet families "
                            "only (diffusers has no PixArt LoRA loader)")
        return cls(**load_pixart_components(lcm.model), device=device, resolution=lcm.resolution,
                   guidance_scale=lcm.guidance_scale, mixed_precision=cfg.mixed_precision,
                   lora_rank=cfg.lora_rank if lora else None, lora_alpha=cfg.lora_alpha, lora_targets=lcm.lora_targets,
                   heldout_fraction=lcm.heldout_fraction, chain_scheduler=lcm.scheduler,
                   vae_checkpointing=lcm.vae_checkpointing)

    # --- prompts and the network ------------------------------------------------------------------------
    @torch.no_grad()
    def _text_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 hidden states, attention mask) per prompt by the pipeline's own encode_prompt. Every prompt is
        padded to max_sequence_length; encoded one at a time all the same, so that a prompt's cached states do not
        depend on which other prompts missed the cache with it (a batch's float rounding does: exact resume)."""
        for p in dict.fromkeys(p for p in prompts if p not in self._text_cache):
            autocast = self.text_dtype != torch.float32
            with torch.autocast(self.device.type, dtype=self.text_dtype, enabled=autocast):
                states, mask, _, _ = self.pipeline.encode_prompt(
                    [p], do_classifier_free_guidance=False, num_images_per_prompt=1, device=self.device,
                    clean_caption=False, max_sequence_length=self.max_sequence_length)
            self._text_cache[p] = (states[0], mask[0])
        return (torch.stack([self._text_cache[p][0] for p in prompts]),
                torch.stack([self._text_cache[p][1] for p in prompts]))

    def encode_prompts(self, prompts: list[str]) -> PixArtConditioning:
        n = len(prompts)
        text, mask = self._text_states(prompts)
        uncond = uncond_mask = None
        if self.classifier_free:  # the pipeline's negative prompt "" (same padding and length)
            uncond, uncond_mask = self._text_states([""] * n)
        resolution = aspect = None
        if self._micro is not None:
            resolution, aspect = self._micro[0].expand(n, -1), self._micro[1].expand(n, -1)
        return PixArtConditioning(text, mask, uncond, uncond_mask, resolution, aspect)

    def model_output(self, x: torch.Tensor, timestep: int, cond: PixArtConditioning) -> torch.Tensor:
        text, mask, resolution, aspect = cond.text, cond.mask, cond.resolution, cond.aspect_ratio
        if cond.uncond is not None:
            x, text, mask = torch.cat([x, x]), torch.cat([cond.uncond, text]), torch.cat([cond.uncond_mask, mask])
            if resolution is not None:
                resolution, aspect = torch.cat([resolution, resolution]), torch.cat([aspect, aspect])
        t = torch.full((x.shape[0],), int(timestep), dtype=torch.long, device=x.device)
        with self._autocast():
            out = self.network(x, encoder_hidden_states=text,
                               encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs={"resolution": resolution, "aspect_ratio": aspect}).sample
        if cond.uncond is not None:
            out_uncond, out_text = out.chunk(2)
            out = out_uncond + self.guidance_scale * (out_text - out_uncond)
        if self.learned_sigma:  # the variance channels are not used by the sampler
            out = out.chunk(2, dim=1)[0]
        return out

    # --- our adapter ------------------------------------------------------------------------------------
    def _attach_adapter(self, config: LoraConfig) -> None:
        try:
            inject_adapter_in_model(config, self.network, adapter_name=OUR_ADAPTER)
        except ValueError as exc:
            raise UserError(f"cannot attach the LoRA adapter (lora_targets {list(config.target_modules)}): "
                            f"{str(exc).splitlines()[0]}") from None
        for name, param in self.network.named_parameters():
            param.requires_grad_(f".{OUR_ADAPTER}." in name)
        cast_training_params(self.network, torch.float32)
        self.has_adapter = True

    def save_adapter(self, directory: Path) -> None:
        """The peft adapter (adapter_model.safetensors + adapter_config.json) in PeftModel's own key names
        (base_model.model.*): what load_adapter resumes from and what PeftModel.from_pretrained loads into a stock
        PixArtAlphaPipeline's transformer (diffusers 0.42 has no PixArt LoRA loader). Loaded back that way into a
        weightless transformer and refused (UserError, weights file removed) unless every tensor lands as trained."""
        if not self.has_adapter:
            raise UserError("this lcm world has no adapter to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {PEFT_PREFIX + k: v.detach().float().contiguous() for k, v in self.adapter_state_dict().items()}
        save_file(weights, directory / PEFT_ADAPTER_FILE)
        self.adapter_config().save_pretrained(directory)  # adapter_config.json
        try:
            check_peft_adapter_loads_completely(self.network, OUR_ADAPTER, directory)
        except UserError:
            (directory / PEFT_ADAPTER_FILE).unlink(missing_ok=True)
            raise

    def load_adapter(self, directory: Path) -> None:
        """Load an adapter written by save_adapter (adding it first if this world has none)."""
        directory = Path(directory)
        weights = self._read_adapter(directory)
        bare = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
        expected = set(self.adapter_state_dict())
        if set(bare) != expected:
            odd = sorted(set(bare) ^ expected)[0]
            raise UserError(f"adapter in {directory} does not fit this model ({len(set(bare) - expected)} unexpected, "
                            f"{len(expected - set(bare))} missing keys, e.g. {odd})")
        set_peft_model_state_dict(self.network, bare, adapter_name=OUR_ADAPTER)
        cast_training_params(self.network, torch.float32)


def check_peft_adapter_loads_completely(network: torch.nn.Module, adapter: str, directory: Path) -> None:
    """Load the peft adapter in `directory` the way PeftModel.from_pretrained does (PeftModel on the config
    from adapter_config.json, then load_peft_weights + set_peft_model_state_dict) into a weightless (meta-device)
    transformer of `network`'s config, and refuse it (one-line UserError) unless exactly the LoRA tensors of
    `adapter` land there, with the same shapes and scales. (PeftModel.from_pretrained only warns about keys it
    cannot place; the values are checked against a real load in tests/test_lcm_dit.py.)"""
    with torch.device("meta"):
        shadow = model_class(network).from_config(network.config)  # not DDP's generated subclass
    try:
        config = LoraConfig.from_pretrained(str(directory))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftModel(shadow, config, adapter_name="check")
            result = set_peft_model_state_dict(loaded, load_peft_weights(str(directory), device="cpu"),
                                               adapter_name="check")
    except Exception as exc:  # noqa: BLE001 -- any loader failure means a stock pipeline cannot use the files
        raise UserError(f"the exported adapter in {directory} does not load with PeftModel.from_pretrained "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    not_loaded = {k.removeprefix(PEFT_PREFIX).replace(".check.", ".") for k in result.missing_keys}
    ours, landed = lora_layout(network, adapter), lora_layout(loaded.get_base_model(), "check")
    landed = {k: v for k, v in landed.items() if k not in not_loaded}
    missing = sorted(set(ours) - set(landed))
    wrong = sorted(k for k in set(ours) & set(landed) if ours[k] != landed[k])
    extra = sorted(set(landed) - set(ours)) + list(result.unexpected_keys)
    if missing or wrong or extra:
        example = (missing or wrong or extra)[0]
        raise UserError(
            f"the exported adapter in {directory} would load incompletely into a stock PixArtAlphaPipeline's "
            f"transformer: {len(set(ours) & set(landed)) - len(wrong)} of {len(ours)} tensors land as trained "
            f"({len(missing)} missing, {len(wrong)} with another shape or scale, {len(extra)} unexpected, "
            f"e.g. {example}); not exported")


def load_pixart_components(model: str) -> dict:
    """transformer, vae, text encoder, tokenizer and scheduler of a PixArtAlphaPipeline folder or hub id
    (float32; the world casts them)."""
    with hub_errors(model, "diffusion model"):
        pipe = PixArtAlphaPipeline.from_pretrained(model, local_files_only=offline())
    names = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [n for n in names if getattr(pipe, n, None) is None]
    if missing:
        raise UserError(f"{model} is not a complete PixArt pipeline (no {', '.join(missing)})")
    return {n: getattr(pipe, n) for n in names}
