"""What the lcm worlds share (the SD-1.5 / SDXL UNet world in unet.py, the PixArt transformer world in
pixart.py): the shared constructor steps (dtypes and device, the chain's scheduler, the latent geometry),
decoding, the timestep grid, the reference policy, the prompt split and reading a saved adapter back.
A subclass builds its pipeline, encodes prompts, calls its network and attaches and exports its adapter."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from diffusers import LCMScheduler, TCDScheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file

from cmalign.errors import UserError
from cmalign.precision import WEIGHT_DTYPES
from cmalign.prompts import bundled_prompts, split_prompts
from cmalign.worlds.base import World, adapters_disabled
from cmalign.worlds.lcm.config import CHAINS, LCMConfig, check_lcm_section
from cmalign.worlds.lcm.distilled import TRANSITIONS, build_transition
from cmalign.worlds.lcm.family import optional_ref
from cmalign.worlds.lcm.lora import OUR_ADAPTER, PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE, adapter_spec, only_adapter_active
from cmalign.worlds.lcm.tcd import TCDTransition, chain_transition

DEFAULT_PROMPTS = "simple_animals"
SCHEDULERS = {"lcm": LCMScheduler, "tcd": TCDScheduler}


def refuse_transition(cfg, transition) -> None:
    """The lcm worlds sample their own (lcm, tcd) chain: a method asking for another one is refused."""
    if transition is not None:
        raise UserError(f"{cfg.method} needs a diffusion model's DDIM chain; the lcm world samples consistency "
                        "(lcm, tcd) chains only")


def transformer_adapter(cfg, transition, lora: bool, what: str, why: str = ""):
    """What a transformer world's from_config checks (its own chain; no UNet or LoRA to put on it), and the spec of
    our adapter (None: lora False or no rank)."""
    refuse_transition(cfg, transition)
    check_lcm_section(cfg.lcm)
    lcm = cfg.lcm
    if optional_ref(lcm.unet) or optional_ref(lcm.lora):
        raise UserError(f"{lcm.model} is a {what} pipeline: --lcm.unet and --lcm.lora apply to the UNet families only{why}")
    return adapter_spec(cfg.lora_rank if lora else None, cfg.lora_alpha, lcm.lora_targets)


class LCMWorldBase(World):
    name = "lcm"
    config_sections = {"lcm": LCMConfig}
    grad_checkpointing_default = True  # DESIGN §2: 512 px chains are memory-bound
    family: str
    base_adapter: str | None = None  # a stacked LCM-LoRA's adapter name (UNet families)
    classifier_free = False

    @classmethod
    def check_config(cls, cfg) -> None:
        check_lcm_section(cfg.lcm)

    @classmethod
    def chain_transition(cls, cfg):
        return chain_transition(cfg.lcm)

    # --- the shared constructor steps -----------------------------------------------------------------
    def _setup(self, settings: LCMConfig, device, mixed_precision: str, vae) -> None:
        """Device, dtypes, guidance and prompt settings; the VAE's float16 upcast."""
        if mixed_precision not in WEIGHT_DTYPES:
            raise UserError(f"mixed_precision must be one of {', '.join(WEIGHT_DTYPES)}, got {mixed_precision!r}")
        self.device = torch.device(device)
        self.weight_dtype = WEIGHT_DTYPES[mixed_precision]
        self.autocast_dtype = None if self.weight_dtype == torch.float32 else self.weight_dtype
        self.dtype = torch.float32  # the chain's latents and noise; networks run under autocast
        # the SDXL VAE overflows in float16 (force_upcast): it stays in float32, as the stock pipeline upcasts it
        self.vae_upcast = self.weight_dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        self.guidance_scale = settings.guidance_scale
        self.heldout_fraction = settings.heldout_fraction
        self._text_cache: dict = {}
        self._timesteps: dict[int, list[int]] = {}
        self.has_adapter = False

    def _setup_transformer_pipeline(self, pipeline_cls, components: dict, settings: LCMConfig, chain: str, device,
                                    mixed_precision: str) -> None:
        """The transformer worlds' shared constructor steps (PixArt, SANA-Sprint): dtypes (the text encoder in float32
        under float16: T5 and Gemma-2 overflow there; it runs once per prompt), placement, the chain's scheduler, the
        stock pipeline and the latent geometry (the VAE's downsampling times the patch size)."""
        transformer, vae = components["transformer"], components["vae"]
        self._setup(settings, device, mixed_precision, vae)
        self.text_dtype = torch.float32 if self.weight_dtype == torch.float16 else self.weight_dtype
        self._place([(transformer, self.weight_dtype), (components["text_encoder"], self.text_dtype),
                     (vae, self._vae_dtype())])
        if settings.vae_checkpointing:
            vae.enable_gradient_checkpointing()
        scheduler = self._use_scheduler(components["scheduler"], chain, settings.tcd_gamma)
        self.pipeline = pipeline_cls(**dict(components, scheduler=scheduler))
        self.pipeline.set_progress_bar_config(disable=True)
        self.network, self.vae = transformer, vae
        config, scale = transformer.config, self.pipeline.vae_scale_factor
        self._set_geometry(settings.resolution, config, scale * config.patch_size,
                           f"the VAE's downsampling {scale} times the transformer's patch size {config.patch_size}")

    def _place(self, modules: list[tuple[torch.nn.Module, torch.dtype]]) -> None:
        """Freeze each module and move it to the device in its dtype."""
        for module, dtype in modules:
            module.requires_grad_(False).eval().to(self.device)
            if module.dtype != dtype:  # (diffusers warns on every dtype cast, even a no-op one)
                module.to(dtype=dtype)

    def _vae_dtype(self) -> torch.dtype:
        return torch.float32 if self.vae_upcast else self.weight_dtype

    def _use_scheduler(self, scheduler, chain: str, tcd_gamma: float):
        """The chain's scheduler (lcm | tcd | a distilled sampler's) from the pipeline's scheduler config, and the
        chain constants."""
        if chain in TRANSITIONS:
            return self._use_distilled(scheduler, chain)
        if chain not in SCHEDULERS:
            raise UserError(f"lcm.scheduler must be one of {', '.join(CHAINS)}, got {chain!r}")
        scheduler_cls = SCHEDULERS[chain]
        if not isinstance(scheduler, scheduler_cls):
            scheduler = scheduler_cls.from_config(scheduler.config)
        if getattr(scheduler.config, "thresholding", False) or getattr(scheduler.config, "clip_sample", False):
            raise UserError(f"the {chain} scheduler clips or thresholds x0, which the differentiable chain "
                            "does not do; set clip_sample and thresholding to false in its scheduler config")
        self.scheduler, self.chain_scheduler = scheduler, chain
        self.transition = TCDTransition(tcd_gamma) if chain == "tcd" else None
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64).to(self.device)
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.original_inference_steps = scheduler.config.original_inference_steps
        self.timestep_scaling = float(getattr(scheduler.config, "timestep_scaling", 10.0))
        return scheduler

    def _use_distilled(self, scheduler, chain: str):
        """A distilled sampler's chain (distilled.py) on the pipeline's scheduler config: its stock scheduler (the
        transition's own, e.g. EulerDiscreteScheduler with trailing spacing) becomes the world's."""
        self.transition = build_transition(chain, scheduler.config)
        self.scheduler, self.chain_scheduler = self.transition.scheduler, chain
        abar = getattr(self.scheduler, "alphas_cumprod", None)  # SCM (continuous time) has none
        self.alphas_cumprod = None if abar is None else abar.to(torch.float64).to(self.device)
        config = self.scheduler.config
        self.prediction_type = config.prediction_type
        self.num_train_timesteps = config.get("num_train_timesteps")
        return self.scheduler

    def _set_geometry(self, resolution: int | None, config, multiple: int, why: str) -> None:
        """resolution (default: the network's sample_size in pixels) and the latent shape."""
        scale = self.pipeline.vae_scale_factor
        self.resolution = resolution or config.sample_size * scale
        if self.resolution % multiple:
            raise UserError(f"resolution must be a multiple of {multiple} ({why}), got {self.resolution}")
        side = self.resolution // scale
        self.latent_shape = (config.in_channels, side, side)

    def default_prompts(self) -> tuple[list[str], list[str]]:
        """(train, held-out) from the bundled simple-animals set, split by heldout_fraction."""
        return split_prompts(bundled_prompts(DEFAULT_PROMPTS), self.heldout_fraction)

    # --- decoding and the chain ------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

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

    def timesteps(self, num_steps: int) -> list:
        """The pipeline scheduler's own grid (its config decides spacing and original steps); a distilled sampler's
        is its transition's (e.g. trailing whatever the base's config says; SCM's continuous t)."""
        if num_steps not in self._timesteps and self.chain_scheduler in TRANSITIONS:
            if num_steps < 1:
                raise UserError(f"cannot sample with K={num_steps} steps")
            self._timesteps[num_steps] = self.transition.timesteps(self, num_steps)
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
        with only_adapter_active(self.network, self.base_adapter):
            yield

    # --- our adapter ------------------------------------------------------------------------------------
    def _mark_trainable(self) -> None:
        """Only our adapter trains, in float32 (set_adapter(s) marks every active adapter trainable)."""
        for name, param in self.network.named_parameters():
            param.requires_grad_(f".{OUR_ADAPTER}." in name)
        cast_training_params(self.network, torch.float32)
        self.has_adapter = True

    def adapter_config(self) -> LoraConfig:
        return self.network.peft_config[OUR_ADAPTER]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Our adapter's weights in peft naming, without the adapter name."""
        return get_peft_model_state_dict(self.network, adapter_name=OUR_ADAPTER)

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

    def _attach_adapter(self, config: LoraConfig) -> None:
        raise NotImplementedError
