"""SANA-Sprint in the lcm world: SanaSprintPipeline (SanaTransformer2DModel with a guidance embedding, Gemma-2
text encoder, AutoencoderDC, SCMScheduler), e.g. Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers.

The chain is distilled.SCMTransition (TrigFlow, DESIGN §2 "Other chain families") on x = latents / sigma_data;
the network call follows SanaSprintPipeline.__call__:
- text: the pipeline's own encode_prompt with its default complex human instruction prepended (Gemma hidden
  states and attention mask, the first and the last max_sequence_length - 1 tokens), once per prompt;
- guidance: embedded, guidance_scale x the transformer's guidance_embeds_scale (the card's 4.5); no CFG pass;
- timestep: u = sin t / (cos t + sin t) in float32, as the pipeline computes it;
- decoding: vae.decode(x0 / scaling_factor) (no latents mean / std).
The stock pipeline's use_resolution_binning maps the model's native square size (1024 for sample_size 32) to
itself; at other sizes ours equals the pipeline called with use_resolution_binning=False.

LoRA: SanaTransformer2DModel has diffusers' adapter mixin and SanaSprintPipeline a LoRA loader
(SanaLoraLoaderMixin), so our adapter goes on as on the UNets (LCMWorld's _attach_adapter, save_adapter,
load_adapter) and is exported as pytorch_lora_weights.safetensors for `pipe.load_lora_weights(DIR)` (checked to
load completely into a weightless transformer) plus the peft adapter (adapter_model.safetensors +
adapter_config.json) for resuming.

The Gemma tokenizer is read from tokenizer/tokenizer.json (a fast tokenizer: no sentencepiece needed); a folder
without a loadable tokenizer is refused in one line (loading.load_sana_components).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import SanaSprintPipeline, SanaTransformer2DModel
from peft import LoraConfig

from cmalign.errors import UserError
from cmalign.worlds.lcm.config import LCMConfig
from cmalign.worlds.lcm.core import transformer_adapter
from cmalign.worlds.lcm.loading import load_sana_components
from cmalign.worlds.lcm.unet import LCMWorld

__all__ = ["SanaSprintWorld", "SanaConditioning"]

MAX_SEQUENCE_LENGTH = 300  # SanaSprintPipeline's default
# the instruction SanaSprintPipeline.__call__ prepends to every prompt by default
COMPLEX_HUMAN_INSTRUCTION = inspect.signature(SanaSprintPipeline.__call__).parameters["complex_human_instruction"].default


@dataclass
class SanaConditioning:
    """What the transformer is conditioned on for a batch of prompts."""

    text: torch.Tensor  # (B, L, D) Gemma hidden states
    mask: torch.Tensor  # (B, L) their attention mask
    guidance: torch.Tensor  # (B,) guidance_scale x guidance_embeds_scale


class SanaSprintWorld(LCMWorld):
    """The lcm world on a SANA-Sprint pipeline; the shared steps are core.LCMWorldBase's and the adapter's (attach,
    export through diffusers' LoRA loader, resume) LCMWorld's, on the transformer."""

    family = "sana"
    lora_component = "transformer"

    def __init__(self, transformer: SanaTransformer2DModel, vae, text_encoder, tokenizer, scheduler, *,
                 settings: LCMConfig | None = None, device: str | torch.device = "cpu", mixed_precision: str = "no",
                 adapter: LoraConfig | None = None, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """Wrap already-built components; `settings` as for LCMWorld (default: SANA-Sprint's guidance 4.5, scm)."""
        settings = settings or LCMConfig(guidance_scale=4.5, scheduler="scm")
        if settings.scheduler != "scm":
            raise UserError(f"lcm.scheduler {settings.scheduler} is not supported for SANA-Sprint (scm only)")
        if settings.vae_checkpointing:
            raise UserError("lcm.vae_checkpointing: SANA's AutoencoderDC has no gradient checkpointing; leave it off")
        if not getattr(transformer.config, "guidance_embeds", False):
            raise UserError("the transformer has no guidance embedding (guidance_embeds): not a SANA-Sprint model")
        components = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=scheduler)
        self._setup_transformer_pipeline(SanaSprintPipeline, components, settings, "scm", device, mixed_precision)
        config = transformer.config
        self.max_sequence_length = int(max_sequence_length)
        self._guidance = (torch.full([1], float(self.guidance_scale), dtype=torch.float32)
                          * float(config.guidance_embeds_scale)).to(self.device)
        self.base_adapter = None
        if adapter is not None:
            self._attach_adapter(adapter)

    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> "SanaSprintWorld":
        adapter = transformer_adapter(cfg, transition, lora, "SANA-Sprint")
        lcm = cfg.lcm
        return cls(**load_sana_components(lcm.model), settings=lcm, device=device,
                   mixed_precision=cfg.mixed_precision, adapter=adapter)

    # --- prompts and the network ------------------------------------------------------------------------
    @torch.no_grad()
    def _text_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Gemma hidden states, attention mask) per prompt by the pipeline's own encode_prompt, one prompt at a time
        (padded to a fixed length: a prompt's cached states do not depend on its batch)."""
        for p in dict.fromkeys(p for p in prompts if p not in self._text_cache):
            autocast = self.text_dtype != torch.float32
            with torch.autocast(self.device.type, dtype=self.text_dtype, enabled=autocast):
                states, mask = self.pipeline.encode_prompt(
                    [p], num_images_per_prompt=1, device=self.device, clean_caption=False,
                    max_sequence_length=self.max_sequence_length, complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION)
            self._text_cache[p] = (states[0], mask[0])
        return (torch.stack([self._text_cache[p][0] for p in prompts]),
                torch.stack([self._text_cache[p][1] for p in prompts]))

    def encode_prompts(self, prompts: list[str]) -> SanaConditioning:
        text, mask = self._text_states(prompts)
        return SanaConditioning(text, mask, self._guidance.expand(len(prompts)))

    def model_output(self, x: torch.Tensor, timestep, cond: SanaConditioning) -> torch.Tensor:
        """The transformer's raw output F at the SCM timestep u (a float; computed in float32 by the transition)."""
        u = torch.full((x.shape[0],), float(timestep), dtype=torch.float32, device=x.device)
        with self._autocast():
            return self.network(x, encoder_hidden_states=cond.text, encoder_attention_mask=cond.mask,
                                guidance=cond.guidance.to(cond.text.dtype), timestep=u).sample
