"""The lcm world: real latent consistency models through diffusers (DESIGN §1, §2).

Two UNet families, picked by the pipeline folder's own model_index.json (`_class_name`):
- sd: SD-1.5-class (LatentConsistencyModelPipeline, e.g. SimianLuo/LCM_Dreamshaper_v7, or a
  StableDiffusionPipeline base with an LCM-LoRA);
- sdxl: SDXL-class (StableDiffusionXLPipeline: two text encoders, pooled text embeddings and
  add_time_ids; LCM-SDXL and LCM-SSD-1B UNets, SDXL/SSD-1B bases with an LCM-LoRA or TCD-LoRA).
Two chain families: lcm (LCMScheduler; chain.ConsistencyTransition) and tcd (TCDScheduler; tcd.TCDTransition).

The chain (chain.run_chain) reproduces the stock pipeline driven by that scheduler exactly for the same
noise; everything the pipeline computes once per call (text embeddings, pooled embeddings and time ids,
the guidance embedding of w - 1) is computed here once per prompt, by the pipeline's own methods.

Stacked LCM-LoRA (lcm.lora_mode "stack"): the LCM-LoRA stays a separate, frozen peft adapter under
ours; the reference policy switches only OUR adapter off (see `reference_policy`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from diffusers import (
    DiffusionPipeline, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionXLPipeline, TCDScheduler,
    UNet2DConditionModel,
)
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from cmalign.worlds.lcm.config import LCMConfig
from cmalign.errors import UserError
from cmalign.hub import hub_errors, is_local, offline
from cmalign.precision import WEIGHT_DTYPES
from cmalign.prompts import bundled_prompts, read_prompt_file, split_prompts
from cmalign.worlds.base import World, adapters_disabled, model_class
from cmalign.worlds.lcm.tcd import TCDTransition

__all__ = ["LCMWorld", "PromptConditioning", "read_prompt_file", "load_components", "model_family"]

OUR_ADAPTER = "rocm"  # our trainable LoRA
LCM_ADAPTER = "lcm"  # a stacked LCM-LoRA: frozen, part of both the policy and the reference
DEFAULT_PROMPTS = "simple_animals"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what a stock pipeline's load_lora_weights reads
PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"  # for resuming

# model_index.json _class_name -> UNet family
FAMILIES = {"StableDiffusionPipeline": "sd", "LatentConsistencyModelPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
            "PixArtAlphaPipeline": "pixart"}  # pixart: a transformer (PixArt-LCM), worlds/lcm_dit.py
PIPELINES = {"sd": LatentConsistencyModelPipeline, "sdxl": StableDiffusionXLPipeline}
SCHEDULERS = {"lcm": LCMScheduler, "tcd": TCDScheduler}
# methods that need the chain's step log-probabilities, which a deterministic chain (TCD gamma = 0) lacks
LOG_PROB_METHODS = ("rlcm", "ddpo", "dpok", "d3po")


@dataclass
class PromptConditioning:
    """What the UNet is conditioned on for a batch of prompts."""

    text: torch.Tensor  # (B, 77, D) text-encoder hidden states
    guidance: torch.Tensor | None  # (B, time_cond_proj_dim) embedding of w - 1 (LCMs distilled with guidance)
    uncond: torch.Tensor | None = None  # (B, 77, D) empty-prompt states when classifier-free guidance runs
    pooled: torch.Tensor | None = None  # sdxl: (B, P) pooled text embedding of the second encoder
    time_ids: torch.Tensor | None = None  # sdxl: (B, 6) original size, crop corner, target size
    uncond_pooled: torch.Tensor | None = None  # sdxl with classifier-free guidance


class LCMWorld(World):
    name = "lcm"
    config_sections = {"lcm": LCMConfig}
    grad_checkpointing_default = True  # DESIGN §2: 512 px chains are memory-bound

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        *,
        text_encoder_2=None,
        tokenizer_2=None,
        device: str | torch.device = "cpu",
        resolution: int | None = None,
        guidance_scale: float = 8.0,
        mixed_precision: str = "no",
        lora_rank: int | None = 8,
        lora_alpha: float = 8.0,
        lora_targets=DEFAULT_LORA_TARGETS,
        lora_init: bool | str = True,
        base_adapter: str | None = None,
        heldout_fraction: float = 0.2,
        chain_scheduler: str = "lcm",
        tcd_gamma: float = 0.3,
        vae_checkpointing: bool = False,
        force_zeros_for_empty_prompt: bool = True,
    ):
        """Wrap already-built components (two text encoders and tokenizers: the sdxl family). `base_adapter`
        names a peft adapter already on the UNet that belongs to the base model (a stacked LCM-LoRA);
        `lora_rank=None` adds no adapter of ours. chain_scheduler: lcm | tcd (with tcd_gamma)."""
        if mixed_precision not in WEIGHT_DTYPES:
            raise UserError(f"mixed_precision must be one of {', '.join(WEIGHT_DTYPES)}, got {mixed_precision!r}")
        if chain_scheduler not in SCHEDULERS:
            raise UserError(f"lcm.scheduler must be one of {', '.join(SCHEDULERS)}, got {chain_scheduler!r}")
        self.family = "sdxl" if text_encoder_2 is not None else "sd"
        _check_unet_family(unet.config, self.family, "the UNet")
        self.device = torch.device(device)
        self.weight_dtype = WEIGHT_DTYPES[mixed_precision]
        self.autocast_dtype = None if self.weight_dtype == torch.float32 else self.weight_dtype
        self.dtype = torch.float32  # the chain's latents and noise; networks run under autocast
        # the SDXL VAE overflows in float16 (force_upcast): it stays in float32, as the stock pipeline upcasts it
        self.vae_upcast = self.weight_dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        for module in (unet, vae, text_encoder, text_encoder_2):
            if module is None:
                continue
            module.requires_grad_(False).eval().to(self.device)
            dtype = torch.float32 if (module is vae and self.vae_upcast) else self.weight_dtype
            if module.dtype != dtype:  # (diffusers warns on every dtype cast, even a no-op one)
                module.to(dtype=dtype)
        if vae_checkpointing:
            vae.enable_gradient_checkpointing()  # diffusers' own: the decoder's mid and up blocks recompute

        scheduler_cls = SCHEDULERS[chain_scheduler]
        if not isinstance(scheduler, scheduler_cls):
            scheduler = scheduler_cls.from_config(scheduler.config)
        if getattr(scheduler.config, "thresholding", False) or getattr(scheduler.config, "clip_sample", False):
            raise UserError(f"the {chain_scheduler} scheduler clips or thresholds x0, which the differentiable chain "
                            "does not do; set clip_sample and thresholding to false in its scheduler config")
        self.scheduler, self.chain_scheduler = scheduler, chain_scheduler
        self.transition = TCDTransition(tcd_gamma) if chain_scheduler == "tcd" else None
        if self.family == "sdxl":
            self.pipeline = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
            )
        else:
            self.pipeline = LatentConsistencyModelPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        self.pipeline.set_progress_bar_config(disable=True)
        self.network, self.vae = unet, vae
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64).to(self.device)
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.original_inference_steps = scheduler.config.original_inference_steps
        self.timestep_scaling = float(getattr(scheduler.config, "timestep_scaling", 10.0))

        scale = self.pipeline.vae_scale_factor
        self.resolution = resolution or unet.config.sample_size * scale
        if self.resolution % scale:
            raise UserError(f"resolution must be a multiple of {scale} (the VAE's downsampling), got {self.resolution}")
        side = self.resolution // scale
        self.latent_shape = (unet.config.in_channels, side, side)

        self.guidance_scale = guidance_scale
        guidance_dim = unet.config.time_cond_proj_dim
        self._guidance = None
        if guidance_dim is not None:  # LCM distilled with guidance: w enters as an embedding, as in the pipeline
            w = torch.tensor([guidance_scale - 1.0])
            self._guidance = self.pipeline.get_guidance_scale_embedding(w, embedding_dim=guidance_dim).to(self.device)
        # A UNet without that input (SD-1.5 / SDXL + LCM-LoRA) gets real CFG, as the stock pipelines do
        self.classifier_free = guidance_dim is None and guidance_scale > 1
        self._time_ids = None
        if self.family == "sdxl":  # SDXL's micro-conditioning: (original size, crop top-left, target size)
            size = (self.resolution, self.resolution)
            self._time_ids = self.pipeline._get_add_time_ids(
                size, (0, 0), size, dtype=torch.float32,
                text_encoder_projection_dim=int(text_encoder_2.config.projection_dim)).to(self.device)
        self.heldout_fraction = heldout_fraction
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._timesteps: dict[int, list[int]] = {}

        self.base_adapter = base_adapter
        self.has_adapter = False
        if lora_rank is not None:
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(lora_targets),
                                init_lora_weights=lora_init)
            self._attach_adapter(config)

    # --- construction from a config -------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg) -> None:
        lcm = cfg.lcm
        if not 0.0 <= lcm.tcd_gamma <= 1.0:
            raise UserError(f"lcm.tcd_gamma must be in [0, 1], got {lcm.tcd_gamma}")
        if lcm.scheduler == "tcd" and lcm.tcd_gamma == 0:
            if cfg.method in LOG_PROB_METHODS:
                raise UserError(f"{cfg.method} needs the chain's step log-probabilities, but TCD with tcd_gamma 0 is "
                                "deterministic; use tcd_gamma > 0 or rocm/draft")
            from cmalign.rewards.registry import reward_spec

            # rocm's score-function estimator of such terms would get zero gradient from deterministic steps
            names = [n for n in cfg.reward_weights if ":" not in n]
            blind = [n for n in names if n in _registered_rewards() and not reward_spec(n).differentiable]
            if blind:
                raise UserError(f"reward {blind[0]} is not differentiable and TCD with tcd_gamma 0 has no stochastic "
                                "step to estimate its gradient through; use tcd_gamma > 0")

    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> "LCMWorld":
        """Load cfg.lcm.model (hub id or folder; its family from its model_index.json), swap in cfg.lcm.unet,
        apply cfg.lcm.lora if given, add our adapter."""
        if transition is not None:
            raise UserError(f"{cfg.method} needs a diffusion model's DDIM chain; the lcm world samples consistency "
                            "(lcm, tcd) chains only")
        cls.check_config(cfg)
        lcm = cfg.lcm
        if model_family(lcm.model, lcm.unet) == "pixart":
            from cmalign.worlds.lcm.pixart import PixArtLCMWorld

            return PixArtLCMWorld.from_config(cfg, device, lora=lora)
        components = load_components(lcm.model, unet=lcm.unet)
        base_adapter = None
        if lcm.lora:
            base_adapter = apply_lcm_lora(components, lcm.lora, lcm.lora_mode, weight_name=lcm.lora_weight_name)
        return cls(
            **components, device=device, resolution=lcm.resolution, guidance_scale=lcm.guidance_scale,
            mixed_precision=cfg.mixed_precision, lora_rank=cfg.lora_rank if lora else None,
            lora_alpha=cfg.lora_alpha, lora_targets=lcm.lora_targets, base_adapter=base_adapter,
            heldout_fraction=lcm.heldout_fraction, chain_scheduler=lcm.scheduler, tcd_gamma=lcm.tcd_gamma,
            vae_checkpointing=lcm.vae_checkpointing,
        )

    def default_prompts(self) -> tuple[list[str], list[str]]:
        """(train, held-out) from the bundled simple-animals set, split by heldout_fraction."""
        return split_prompts(bundled_prompts(DEFAULT_PROMPTS), self.heldout_fraction)

    # --- prompts, network, decoding ---------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def _text_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled or None) per prompt, by the pipeline's own encode_prompt."""
        # one prompt per encoder call: a batch's float rounding depends on its size and company, so a prompt
        # cached from another batch than in an earlier run (a resumed run's cold cache) would differ in the last bits
        for p in dict.fromkeys(p for p in prompts if p not in self._text_cache):
            with self._autocast():
                out = self.pipeline.encode_prompt(prompt=[p], device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
            self._text_cache[p] = (out[0][0], out[2][0] if self.family == "sdxl" else None)
        states = torch.stack([self._text_cache[p][0] for p in prompts])
        pooled = None if self.family == "sd" else torch.stack([self._text_cache[p][1] for p in prompts])
        return states, pooled

    def encode_prompts(self, prompts: list[str]) -> PromptConditioning:
        n = len(prompts)
        guidance = None if self._guidance is None else self._guidance.expand(n, -1)
        text, pooled = self._text_states(prompts)
        uncond = uncond_pooled = None
        if self.classifier_free:
            if self.family == "sdxl" and self.pipeline.config.force_zeros_for_empty_prompt:
                uncond, uncond_pooled = torch.zeros_like(text), torch.zeros_like(pooled)  # as the stock SDXL pipeline
            else:
                uncond, uncond_pooled = self._text_states([""] * n)
        time_ids = None if self._time_ids is None else self._time_ids.expand(n, -1)
        return PromptConditioning(text, guidance, uncond, pooled, time_ids, uncond_pooled)

    def model_output(self, x: torch.Tensor, timestep: int, cond: PromptConditioning) -> torch.Tensor:
        text, pooled, time_ids = cond.text, cond.pooled, cond.time_ids
        if cond.uncond is not None:
            x, text = torch.cat([x, x]), torch.cat([cond.uncond, cond.text])
            if pooled is not None:
                pooled, time_ids = torch.cat([cond.uncond_pooled, pooled]), torch.cat([time_ids, time_ids])
        added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        with self._autocast():
            out = self.network(x, timestep, encoder_hidden_states=text, timestep_cond=cond.guidance,
                               added_cond_kwargs=added).sample
        if cond.uncond is not None:
            out_uncond, out_text = out.chunk(2)
            out = out_uncond + self.guidance_scale * (out_text - out_uncond)
        return out

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE decode with gradient, mapped from [-1, 1] to [0, 1] and left unclamped (the stock pipelines'
        latent un-scaling, including a VAE's latents_mean / latents_std)."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=x0.device, dtype=x0.dtype).view(shape)
            std = torch.tensor(std, device=x0.device, dtype=x0.dtype).view(shape)
            latents = x0 * std / config.scaling_factor + mean
        else:
            latents = x0 / config.scaling_factor
        if self.vae_upcast:  # a float32 VAE, outside the float16 autocast
            image = self.vae.decode(latents.float()).sample
        else:
            with self._autocast():
                image = self.vae.decode(latents).sample
        return (image.float() + 1) / 2

    def timesteps(self, num_steps: int) -> list[int]:
        """The pipeline scheduler's own grid (its config decides spacing and original steps)."""
        if num_steps not in self._timesteps:
            scheduler = type(self.scheduler).from_config(self.scheduler.config)
            try:
                scheduler.set_timesteps(num_steps)
            except ValueError as exc:
                raise UserError(f"cannot sample with K={num_steps} steps: {exc}") from None
            self._timesteps[num_steps] = [int(t) for t in scheduler.timesteps]
        return list(self._timesteps[num_steps])

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[None]:
        """The frozen reference: our adapter off, a stacked LCM-LoRA still on (full fine-tuning: the frozen copy)."""
        if self.reference_network is not None:
            with World.reference_policy(self):
                yield
            return
        if self.base_adapter is None:
            with adapters_disabled(self.network):
                yield
            return
        with _only_adapter_active(self.network, self.base_adapter):
            yield

    # --- our adapter ------------------------------------------------------------------------------------
    def _attach_adapter(self, config: LoraConfig) -> None:
        try:
            self.network.add_adapter(config, adapter_name=OUR_ADAPTER)
        except ValueError as exc:
            raise UserError(f"cannot attach the LoRA adapter (lora_targets {list(config.target_modules)}): "
                            f"{str(exc).splitlines()[0]}") from None
        if self.base_adapter is not None:
            self.network.set_adapters([self.base_adapter, OUR_ADAPTER])
        # set_adapter(s) marks every active adapter trainable: only ours is
        for name, param in self.network.named_parameters():
            param.requires_grad_(f".{OUR_ADAPTER}." in name)
        cast_training_params(self.network, torch.float32)
        self.has_adapter = True

    def adapter_config(self) -> LoraConfig:
        return self.network.peft_config[OUR_ADAPTER]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Our adapter's weights in peft naming, without the adapter name."""
        return get_peft_model_state_dict(self.network, adapter_name=OUR_ADAPTER)

    def save_adapter(self, directory: Path) -> None:
        """pytorch_lora_weights.safetensors for stock pipelines (load_lora_weights), plus the peft adapter
        (adapter_model.safetensors + adapter_config.json) for resuming.

        The diffusers file holds peft's own key format (lora_A / lora_B) for every target: stock loaders
        choose one key format from the FIRST key, and convert_state_dict_to_diffusers renames only the
        attention projections, so a mixed file (conv1, ff.net.2 beside to_q) lost every attention tensor.
        The file is then loaded back through the stock loader into a weightless copy of the UNet and
        refused (UserError, file removed) unless every tensor lands with our shape and scale."""
        if not self.has_adapter:
            raise UserError("this lcm world has no adapter to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().float().contiguous() for k, v in self.adapter_state_dict().items()}
        config = self.adapter_config().to_dict()
        pipeline_class = type(self.pipeline)
        pipeline_class.save_lora_weights(
            directory, unet_lora_layers=weights, weight_name=DIFFUSERS_LORA_FILE,
            unet_lora_adapter_metadata=config,  # carries lora_alpha: stock loaders would assume alpha = r
        )
        try:
            check_lora_loads_completely(pipeline_class, self.network, OUR_ADAPTER, directory / DIFFUSERS_LORA_FILE)
        except UserError:
            (directory / DIFFUSERS_LORA_FILE).unlink(missing_ok=True)
            raise
        save_file(weights, directory / PEFT_ADAPTER_FILE)
        self.adapter_config().save_pretrained(directory)  # adapter_config.json

    def load_adapter(self, directory: Path) -> None:
        """Load an adapter written by save_adapter (adding it first if this world has none)."""
        directory = Path(directory)
        weights = self._read_adapter(directory)
        result = set_peft_model_state_dict(self.network, weights, adapter_name=OUR_ADAPTER)
        if result.unexpected_keys:
            raise UserError(f"adapter in {directory} does not fit this model ({len(result.unexpected_keys)} unexpected "
                            f"keys, e.g. {result.unexpected_keys[0]})")
        cast_training_params(self.network, torch.float32)

    def _read_adapter(self, directory: Path) -> dict[str, torch.Tensor]:
        """The PEFT weights of an adapter folder whose rank, alpha and targets match this world's
        (attaching an adapter of that shape first if this world has none)."""
        directory = Path(directory)
        weights_path, config_path = directory / PEFT_ADAPTER_FILE, directory / PEFT_CONFIG_FILE
        if not weights_path.is_file() or not config_path.is_file():
            raise UserError(f"no lcm adapter in {directory} (expected {PEFT_ADAPTER_FILE} and {PEFT_CONFIG_FILE})")
        try:
            saved = LoraConfig.from_pretrained(directory)
            weights = load_file(weights_path)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"adapter in {directory} is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None
        if not self.has_adapter:
            self._attach_adapter(saved)
        current = self.adapter_config()
        if (saved.r, saved.lora_alpha, set(saved.target_modules)) != (current.r, current.lora_alpha, set(current.target_modules)):
            raise UserError(
                f"adapter in {directory} has r={saved.r}, alpha={saved.lora_alpha}, targets {sorted(saved.target_modules)}; "
                f"this world's has r={current.r}, alpha={current.lora_alpha}, targets {sorted(current.target_modules)}"
            )
        return weights


@contextlib.contextmanager
def _only_adapter_active(network: torch.nn.Module, name: str) -> Iterator[None]:
    """Run with only adapter `name` active in every LoRA layer, keeping requires_grad flags as they were
    (peft's set_adapter re-flags trainability) and restoring each layer's active adapters after."""
    layers = [m for m in network.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(layer, list(layer.active_adapters), {p: p.requires_grad for p in layer.parameters()}) for layer in layers]
    for layer in layers:
        layer.set_adapter([name])
    try:
        yield
    finally:
        for layer, active, flags in saved:
            layer.set_adapter(active)
            for param, flag in flags.items():
                param.requires_grad_(flag)


def lora_layout(network: torch.nn.Module, adapter: str) -> dict[str, tuple]:
    """{LoRA parameter name without the adapter name: (shape, scaling)} of one adapter on a network."""
    layout = {}
    for module_name, module in network.named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter not in module.scaling:
            continue
        for name, param in module.named_parameters(recurse=True):
            if f".{adapter}." in f".{name}." and ("lora_A" in name or "lora_B" in name):
                key = f"{module_name}.{name}".replace(f".{adapter}.", ".")
                layout[key] = (tuple(param.shape), float(module.scaling[adapter]))
    return layout


def check_lora_loads_completely(pipeline_class, network: torch.nn.Module, adapter: str, path: Path) -> None:
    """Load a diffusers LoRA file with the stock loader of `pipeline_class` into a weightless (meta-device)
    UNet of `network`'s config and refuse it (one-line UserError) unless exactly the tensors of `adapter`
    land there, with the same shapes and scales. Stock loaders only warn about keys they cannot place."""
    path = Path(path)
    state_dict, alphas, metadata = pipeline_class.lora_state_dict(
        path.parent, weight_name=path.name, return_lora_metadata=True)
    with torch.device("meta"):
        shadow = model_class(network).from_config(network.config)  # not DDP's generated subclass
    try:
        pipeline_class.load_lora_into_unet(state_dict, alphas, shadow, adapter_name="check", metadata=metadata,
                                           low_cpu_mem_usage=True)
    except Exception as exc:  # noqa: BLE001 -- any loader failure means a stock pipeline cannot use the file
        raise UserError(f"the exported LoRA {path} does not load into a stock {pipeline_class.__name__} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    ours, landed = lora_layout(network, adapter), lora_layout(shadow, "check")
    missing = sorted(set(ours) - set(landed))
    wrong = sorted(k for k in set(ours) & set(landed) if ours[k] != landed[k])
    if missing or wrong or len(landed) != len(ours):
        example = (missing or wrong or sorted(set(landed) - set(ours)))[0]
        raise UserError(
            f"the exported LoRA {path} would load incompletely into a stock {pipeline_class.__name__}: "
            f"{len(set(ours) & set(landed)) - len(wrong)} of {len(ours)} tensors land as trained "
            f"({len(missing)} missing, {len(wrong)} with another shape or scale, e.g. {example}); not exported"
        )


def _registered_rewards() -> set[str]:
    from cmalign.rewards.registry import REWARDS

    return set(REWARDS.names())


# --- loading ------------------------------------------------------------------------------------------
def _check_unet_family(unet_config, family: str, what: str) -> None:
    sdxl_unet = unet_config.get("addition_embed_type") == "text_time"
    if sdxl_unet != (family == "sdxl"):
        kind = "an SDXL-class UNet (addition_embed_type text_time)" if sdxl_unet else "an SD-1.5-class UNet"
        raise UserError(f"{what} is {kind}, but the pipeline is of the {family} family "
                        f"({'two text encoders' if family == 'sdxl' else 'one text encoder'})")


def _read_config(cls, ref: str, what: str, **kwargs) -> dict:
    with hub_errors(ref, what):
        return dict(cls.load_config(ref, local_files_only=offline(), **kwargs))


def _is_unet_repo(model: str) -> bool:
    try:
        return UNet2DConditionModel.load_config(model, local_files_only=offline()).get("_class_name") == "UNet2DConditionModel"
    except Exception:  # noqa: BLE001 -- not a UNet either: the pipeline's own error stands
        return False


def model_family(model: str, unet: str | None = None) -> str:
    """sd | sdxl from the pipeline's own model_index.json (and the UNet's config.json), read before any
    weights load; an unsupported pipeline or a UNet-only repository is refused in one line."""
    folder = Path(model).expanduser()
    if is_local(model) and not (folder / "model_index.json").is_file():
        hint = ("; a UNet alone is given with --lcm.unet beside its base pipeline (--lcm.model)"
                if (folder / "config.json").is_file() else "")
        raise UserError(f"{model} is not a diffusers pipeline folder (no model_index.json){hint}")
    try:
        index = _read_config(DiffusionPipeline, model, "diffusion model")
    except UserError:
        if not is_local(model) and _is_unet_repo(model):  # e.g. latent-consistency/lcm-sdxl
            raise UserError(f"{model} is a UNet, not a diffusers pipeline; give it with --lcm.unet beside "
                            "its base pipeline (--lcm.model)") from None
        raise
    name = index.get("_class_name")
    family = FAMILIES.get(name)
    if family is None:
        raise UserError(f"{model} is a {name} pipeline; the lcm world runs {', '.join(sorted(FAMILIES))} "
                        "(SD-1.5- and SDXL-class UNets, PixArt-alpha transformers)")
    if family == "pixart":  # no UNet to read or swap (worlds/lcm_dit.py)
        if unet:
            raise UserError(f"{model} is a PixArt pipeline (a transformer); --lcm.unet applies to the UNet families only")
        return family
    unet_config = (_read_config(UNet2DConditionModel, unet, "UNet") if unet
                   else _read_config(UNet2DConditionModel, model, "diffusion model", subfolder="unet"))
    _check_unet_family(unet_config, family, f"the UNet of {unet or model}")
    return family


def load_components(model: str, unet: str | None = None) -> dict:
    """unet, vae, text encoder(s), tokenizer(s) and the scheduler from a diffusers folder or hub id
    (float32; the world casts them and builds its chain's scheduler from this one's config). `unet`
    replaces the pipeline's UNet (e.g. latent-consistency/lcm-sdxl on SDXL base)."""
    family = model_family(model, unet)  # before any weights load
    extra = {}
    if unet:
        with hub_errors(unet, "UNet"):
            extra["unet"] = UNet2DConditionModel.from_pretrained(unet, local_files_only=offline())
    if family == "sd":
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with hub_errors(model, "diffusion model"):
        pipe = DiffusionPipeline.from_pretrained(model, local_files_only=offline(), **extra)
    names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2")
                                                                          if family == "sdxl" else ())
    missing = [n for n in names if getattr(pipe, n, None) is None]
    if missing:
        raise UserError(f"{model} is not a text-to-image latent diffusion pipeline (no {', '.join(missing)})")
    components = {n: getattr(pipe, n) for n in names}
    if family == "sdxl":
        components["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    return components


def _pipeline_of(components: dict):
    modules = {k: v for k, v in components.items() if k != "force_zeros_for_empty_prompt"}
    if "text_encoder_2" in modules:
        return StableDiffusionXLPipeline(**modules, add_watermarker=False)
    return LatentConsistencyModelPipeline(**modules, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


def apply_lcm_lora(components: dict, lora: str, mode: str = "fuse", weight_name: str | None = None) -> str | None:
    """Put an LCM-LoRA (or TCD-, Hyper-SD-LoRA) on the UNet: fused into its weights (returns None) or kept
    as a separate frozen adapter for our LoRA to stack on (returns its adapter name)."""
    if mode not in ("fuse", "stack"):
        raise UserError(f"lcm_lora_mode must be fuse or stack, got {mode!r}")
    pipe = _pipeline_of(components)
    kwargs = {} if weight_name is None else {"weight_name": weight_name}
    with hub_errors(lora, "LCM-LoRA"):
        pipe.load_lora_weights(lora, adapter_name=LCM_ADAPTER, local_files_only=offline(), **kwargs)
    if mode == "stack":
        return LCM_ADAPTER
    pipe.fuse_lora()  # in float32, before any cast to bf16/fp16
    pipe.unload_lora_weights()
    return None
