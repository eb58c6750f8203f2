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

import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file

from cmalign.errors import UserError
from cmalign.worlds.lcm.config import LCMConfig
from cmalign.worlds.lcm.core import LCMWorldBase, transformer_adapter
from cmalign.worlds.lcm.loading import load_pixart_components
from cmalign.worlds.lcm.lora import (
    OUR_ADAPTER, PEFT_ADAPTER_FILE, PEFT_PREFIX, check_peft_adapter_loads_completely,
)

__all__ = ["PixArtLCMWorld", "PixArtConditioning"]

MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's default (PixArt-alpha was trained with 120 T5 tokens)
MICRO_CONDITION_SAMPLE_SIZE = 128  # the pipeline passes resolution / aspect_ratio only at this sample_size


@dataclass
class PixArtConditioning:
    """What the transformer is conditioned on for a batch of prompts."""

    text: torch.Tensor  # (B, L, D) T5 hidden states
    mask: torch.Tensor  # (B, L) their attention mask
    uncond: torch.Tensor | None = None  # empty-prompt states when classifier-free guidance runs
    uncond_mask: torch.Tensor | None = None
    resolution: torch.Tensor | None = None  # (B, 2) (h, w): sample_size 128 only
    aspect_ratio: torch.Tensor | None = None  # (B, 1) h / w


class PixArtLCMWorld(LCMWorldBase):
    """The lcm world on a PixArt-LCM pipeline; the shared steps (dtypes, scheduler, geometry, decode, timesteps,
    reference policy, reading an adapter back) are core.LCMWorldBase's, as for the UNet families."""

    family = "pixart"

    def __init__(self, transformer: PixArtTransformer2DModel, vae, text_encoder, tokenizer, scheduler, *,
                 settings: LCMConfig | None = None, device: str | torch.device = "cpu", mixed_precision: str = "no",
                 adapter: LoraConfig | None = None, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """Wrap already-built components; `settings` as for LCMWorld (default: guidance 0, PixArt-LCM's own)."""
        settings = settings or LCMConfig(guidance_scale=0.0)
        if settings.scheduler != "lcm":
            # PixArtAlphaPipeline returns the scheduler's second output at K = 1, which is not TCD's chain output
            raise UserError(f"lcm.scheduler {settings.scheduler} is not supported for PixArt pipelines (lcm only)")
        _check_tokenizer(text_encoder, tokenizer)
        components = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=scheduler)
        self._setup_transformer_pipeline(PixArtAlphaPipeline, components, settings, "lcm", device, mixed_precision)
        config = transformer.config
        self.learned_sigma = config.out_channels // 2 == config.in_channels  # as the pipeline tests it
        self.classifier_free = self.guidance_scale > 1.0  # the pipeline's do_classifier_free_guidance
        self.max_sequence_length = int(max_sequence_length)
        self._micro = None
        if config.sample_size == MICRO_CONDITION_SAMPLE_SIZE:
            size = float(self.resolution)
            self._micro = (torch.tensor([[size, size]], device=self.device), torch.tensor([[1.0]], device=self.device))
        if adapter is not None:
            self._attach_adapter(adapter)

    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> "PixArtLCMWorld":
        adapter = transformer_adapter(cfg, transition, lora, "PixArt", " (diffusers has no PixArt LoRA loader)")
        lcm = cfg.lcm
        return cls(**load_pixart_components(lcm.model), settings=lcm, device=device,
                   mixed_precision=cfg.mixed_precision, adapter=adapter)

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
        self._mark_trainable()

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


def _check_tokenizer(text_encoder, tokenizer) -> None:
    vocab = int(text_encoder.config.vocab_size)
    if not vocab // 2 <= len(tokenizer) <= vocab:
        # e.g. a sentencepiece spiece.model that transformers could not convert (no sentencepiece/protobuf)
        # leaves a near-empty vocabulary: every word would encode to <unk>
        raise UserError(f"the T5 tokenizer has {len(tokenizer)} tokens for a text encoder of {vocab}: it does not "
                        "belong to it (a spiece.model needs `pip install sentencepiece protobuf` to be converted)")
