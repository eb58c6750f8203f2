"""The lcm world on UNet latent consistency models through diffusers (DESIGN §1, §2).

Two UNet families, picked by the pipeline folder's own model_index.json (`_class_name`, family.py):
- sd: SD-1.5-class (LatentConsistencyModelPipeline, e.g. SimianLuo/LCM_Dreamshaper_v7, or a
  StableDiffusionPipeline base with an LCM-LoRA);
- sdxl: SDXL-class (StableDiffusionXLPipeline: two text encoders, pooled text embeddings and
  add_time_ids; LCM-SDXL and LCM-SSD-1B UNets, SDXL/SSD-1B bases with an LCM-LoRA or TCD-LoRA).
Chain families: lcm (LCMScheduler; chain.ConsistencyTransition), tcd (TCDScheduler; tcd.TCDTransition) and the
distilled samplers (distilled.py): euler (SD-Turbo, SDXL-Lightning), euler_ancestral (SDXL-Turbo), ddim_trailing
(Hyper-SD), each with the stock scheduler's own grid (trailing) and guidance 0 meaning no CFG pass.

The chain (chain.run_chain) reproduces the stock pipeline driven by that scheduler exactly for the same
noise; everything the pipeline computes once per call (text embeddings, pooled embeddings and time ids,
the guidance embedding of w - 1) is computed here once per prompt, by the pipeline's own methods.

Stacked LCM-LoRA (lcm.lora_mode "stack"): the LCM-LoRA stays a separate, frozen peft adapter under
ours; the reference policy switches only OUR adapter off (see `reference_policy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import save_file

from cmalign.errors import UserError
from cmalign.worlds.lcm.config import LCMConfig
from cmalign.worlds.lcm.core import LCMWorldBase, refuse_transition
from cmalign.worlds.lcm.family import check_unet_family, optional_ref
from cmalign.worlds.lcm.loading import apply_lcm_lora, load_components
from cmalign.worlds.lcm.lora import DIFFUSERS_LORA_FILE, OUR_ADAPTER, PEFT_ADAPTER_FILE, adapter_spec, check_lora_loads_completely

__all__ = ["LCMWorld", "PromptConditioning"]


@dataclass
class PromptConditioning:
    """What the UNet is conditioned on for a batch of prompts."""

    text: torch.Tensor  # (B, 77, D) text-encoder hidden states
    guidance: torch.Tensor | None  # (B, time_cond_proj_dim) embedding of w - 1 (LCMs distilled with guidance)
    uncond: torch.Tensor | None = None  # (B, 77, D) empty-prompt states when classifier-free guidance runs
    pooled: torch.Tensor | None = None  # sdxl: (B, P) pooled text embedding of the second encoder
    time_ids: torch.Tensor | None = None  # sdxl: (B, 6) original size, crop corner, target size
    uncond_pooled: torch.Tensor | None = None  # sdxl with classifier-free guidance


class LCMWorld(LCMWorldBase):
    """The lcm world on an SD-1.5- or SDXL-class UNet (an LCM UNet, or a base with an LCM-/TCD-LoRA; SD-Turbo,
    SDXL-Turbo, SDXL-Lightning, Hyper-SD on their distilled samplers)."""

    lora_component = "unet"  # what the pipeline's LoRA loader puts our adapter on (sana.py: the transformer)

    def __init__(self, unet: UNet2DConditionModel, vae, text_encoder, tokenizer, scheduler, *, text_encoder_2=None,
                 tokenizer_2=None, settings: LCMConfig | None = None, device: str | torch.device = "cpu",
                 mixed_precision: str = "no", adapter: LoraConfig | None = None, base_adapter: str | None = None,
                 force_zeros_for_empty_prompt: bool = True):
        """Wrap already-built components (two text encoders and tokenizers: the sdxl family). `settings`: the
        lcm section (resolution, guidance_scale, scheduler, tcd_gamma, heldout_fraction, vae_checkpointing;
        a resolution of 0 means the UNet's own); `adapter`: our LoRA (None: none); `base_adapter` names a peft
        adapter already on the UNet that belongs to the base model (a stacked LCM-LoRA)."""
        settings = settings or LCMConfig()
        self.family = "sdxl" if text_encoder_2 is not None else "sd"
        check_unet_family(unet.config, self.family, "the UNet")
        self._setup(settings, device, mixed_precision, vae)
        self._place([(m, self._vae_dtype() if m is vae else self.weight_dtype)
                     for m in (unet, vae, text_encoder, text_encoder_2) if m is not None])
        if settings.vae_checkpointing:
            vae.enable_gradient_checkpointing()  # diffusers' own: the decoder's mid and up blocks recompute
        scheduler = self._use_scheduler(scheduler, settings.scheduler, settings.tcd_gamma)
        if self.family == "sdxl":
            self.pipeline = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
        else:
            self.pipeline = LatentConsistencyModelPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipeline.set_progress_bar_config(disable=True)
        self.network, self.vae = unet, vae
        scale = self.pipeline.vae_scale_factor
        self._set_geometry(settings.resolution, unet.config, scale, "the VAE's downsampling")
        self._set_guidance(unet.config.time_cond_proj_dim)
        self._set_time_ids(text_encoder_2)
        self.base_adapter = base_adapter
        if adapter is not None:
            self._attach_adapter(adapter)

    def _set_guidance(self, guidance_dim: int | None) -> None:
        """An LCM distilled with guidance gets w as an embedding, as in the pipeline; a UNet without that
        input (SD-1.5 / SDXL + LCM-LoRA) gets real classifier-free guidance, as the stock pipelines do."""
        self._guidance = None
        if guidance_dim is not None:
            w = torch.tensor([self.guidance_scale - 1.0])
            self._guidance = self.pipeline.get_guidance_scale_embedding(w, embedding_dim=guidance_dim).to(self.device)
        self.classifier_free = guidance_dim is None and self.guidance_scale > 1

    def _set_time_ids(self, text_encoder_2) -> None:
        """SDXL's micro-conditioning: (original size, crop top-left, target size)."""
        self._time_ids = None
        if self.family == "sdxl":
            size = (self.resolution, self.resolution)
            self._time_ids = self.pipeline._get_add_time_ids(
                size, (0, 0), size, dtype=torch.float32,
                text_encoder_projection_dim=int(text_encoder_2.config.projection_dim)).to(self.device)

    # --- construction from a config -------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> "LCMWorld":
        """Load cfg.lcm.model (hub id or folder), swap in cfg.lcm.unet, apply cfg.lcm.lora if given, add our
        adapter. (The `lcm` world's factory, factory.LCMFamilyWorld, checks the family first.)"""
        refuse_transition(cfg, transition)
        cls.check_config(cfg)
        lcm = cfg.lcm
        components = load_components(lcm.model, unet=optional_ref(lcm.unet))
        base_adapter, lcm_lora = None, optional_ref(lcm.lora)
        if lcm_lora:
            base_adapter = apply_lcm_lora(components, lcm_lora, lcm.lora_mode, weight_name=optional_ref(lcm.lora_weight_name))
        adapter = adapter_spec(cfg.lora_rank if lora else None, cfg.lora_alpha, lcm.lora_targets)
        return cls(**components, settings=lcm, device=device, mixed_precision=cfg.mixed_precision, adapter=adapter,
                   base_adapter=base_adapter)

    # --- prompts and the network ------------------------------------------------------------------------
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


    # --- our adapter ------------------------------------------------------------------------------------
    def _attach_adapter(self, config: LoraConfig) -> None:
        try:
            self.network.add_adapter(config, adapter_name=OUR_ADAPTER)
        except ValueError as exc:
            raise UserError(f"cannot attach the LoRA adapter (lora_targets {list(config.target_modules)}): "
                            f"{str(exc).splitlines()[0]}") from None
        if self.base_adapter is not None:
            self.network.set_adapters([self.base_adapter, OUR_ADAPTER])
        self._mark_trainable()

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
        pipeline_class, component = type(self.pipeline), self.lora_component
        pipeline_class.save_lora_weights(  # the metadata carries lora_alpha: stock loaders would assume alpha = r
            directory, weight_name=DIFFUSERS_LORA_FILE,
            **{f"{component}_lora_layers": weights, f"{component}_lora_adapter_metadata": config})
        try:
            check_lora_loads_completely(pipeline_class, self.network, OUR_ADAPTER, directory / DIFFUSERS_LORA_FILE,
                                        component)
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
