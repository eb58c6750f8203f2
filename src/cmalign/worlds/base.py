"""The interface every model world implements; the chain, objectives and trainer see only this."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from cmalign import schedule
from cmalign.errors import UserError


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The reference policy: the same network with its LoRA layers switched off (never a copy)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def model_class(module: torch.nn.Module) -> type:
    """The module's own class: torch's composable `replicate` (DDP in place) and `fully_shard` swap a module's
    class for a generated subclass (DDPUNet2DConditionModel ...) whose __new__ builds the ORIGINAL class without
    running __init__, so `type(module).from_config(...)` would return a half-built module."""
    return next(c for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed."))


class World(ABC):
    """A consistency model in the LCM parameterisation with a trainable adapter.

    Subclasses set `name`, `prediction_type`, `alphas_cumprod` (float64, the model's own schedule),
    `latent_shape` (C, H, W), `device`, `dtype` and `network` (the module that carries the adapter),
    and implement `from_config`. Everything the trainer and the evaluation use is declared here, with
    defaults: preparation before seeding, default prompts, prompt checks, per-step and evaluation
    metrics (the digits world's gold), the diversity of samples, noise of the latent shape.
    """

    name: str
    config_sections: dict[str, type] = {}  # section name -> settings dataclass this world owns (config/sections.py)
    prediction_type: str
    alphas_cumprod: torch.Tensor
    latent_shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype = torch.float32
    network: torch.nn.Module
    num_train_timesteps: int = 1000
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0  # LCM's boundary-condition scaling (c_skip, c_out)
    grad_checkpointing_default: bool = False  # memory-bound worlds switch it on

    # --- building -------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> "World":
        """The world of a TrainConfig with a fresh (zero-effect) adapter, or none if lora=False.
        `transition` is the per-step update a method asks for (None: the consistency chain); a world
        that cannot sample it refuses with a UserError."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_config")

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse (UserError) settings this world cannot run; never change cfg."""

    @classmethod
    def default_settings(cls, cfg) -> dict[str, Any]:
        """{"field" or "section.field": value}: this world's defaults for the model cfg names (e.g. the lcm
        families' guidance, batch, dtype), for the config layer to apply to the fields a user did not set."""
        return {}

    @classmethod
    def chain_transition(cls, cfg):
        """The per-step update this world will sample for cfg, built without weights (None: the consistency
        chain); methods check it before any model loads (a `deterministic` one has no step log-probabilities)."""
        return None

    @classmethod
    def prepare(cls, cfg, progress: bool = True) -> None:
        """Build what the world needs once (e.g. a base-model cache); called before the run is seeded,
        so that whether a cache already existed never changes the run's random numbers."""

    # --- prompts and decoding -------------------------------------------------------------------
    def default_prompts(self) -> tuple[list[str], list[str]]:
        """(train, eval) prompts when the config names none."""
        raise UserError(f"the {self.name} world has no default prompts: give prompts or prompt_file")

    def check_prompts(self, prompts: list[str]) -> None:
        """Fail early (UserError) on prompts the world cannot condition on."""
        self.encode_prompts(prompts[:1])

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Any:
        """Conditioning for a batch of prompts (class ids, text embeddings, ...)."""

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Differentiable map from the chain's output to images, nominally in [0, 1], unclamped."""

    # --- the network --------------------------------------------------------------------------------
    @abstractmethod
    def model_output(self, x: torch.Tensor, timestep: int, cond: Any) -> torch.Tensor:
        """The raw network prediction (epsilon, v or sample) with the adapter as currently enabled."""

    transition = None  # None: the consistency update; a chain.DDIMTransition makes this a DDIM sampler (ddpo)

    # --- what the trainer logs beside the reward ------------------------------------------------------
    def step_metrics(self, images01: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Cheap scores of a training batch logged every step (the digits world: gold)."""
        return {}

    def eval_metrics(self, images01: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample scores of the evaluation beyond the training reward (digits: gold terms, accuracy)."""
        return {}

    def diversity(self, images01: torch.Tensor, prompts: list[str]) -> float:
        """Mean pairwise L2 distance between samples of the same prompt (in [-1, 1] space), averaged over the
        prompts with two samples or more (NaN if none); the digits grid measures it per cell position."""
        x = (images01.detach().float().cpu() * 2 - 1).flatten(1)
        values = []
        for p in sorted(set(prompts)):
            idx = [i for i, q in enumerate(prompts) if q == p]
            if len(idx) > 1:
                d = torch.cdist(x[idx], x[idx])
                values.append(d.sum().item() / (len(idx) * (len(idx) - 1)))
        return float(np.mean(values)) if values else float("nan")

    def timesteps(self, num_steps: int) -> list[int]:
        if self.transition is not None:
            grid = self.transition.timesteps(self, num_steps)
            if grid is not None:
                return grid
        return schedule.lcm_timesteps(num_steps, self.num_train_timesteps, self.original_inference_steps)

    def consistency(self, x: torch.Tensor, timestep: int, cond: Any, reference: bool = False) -> torch.Tensor:
        """f(x, t, c) of the policy, or of the reference (adapter disabled inside the call, so that
        gradient checkpointing recomputes the same branch)."""
        with self.reference_policy() if reference else contextlib.nullcontext():
            out = self.model_output(x, timestep, cond)
        abar_t = self.alphas_cumprod[timestep].to(device=x.device, dtype=x.dtype)
        return schedule.consistency_function(
            x, out.to(x.dtype), timestep, abar_t, self.prediction_type, timestep_scaling=self.timestep_scaling
        )

    reference_network: torch.nn.Module | None = None  # full fine-tuning: the frozen copy of the initial network
    reference_offload_device: torch.device | None = None  # where that copy computes when it rests on the CPU

    def reference_policy(self):
        """Context in which the network is the frozen reference (default: every adapter off; under full
        fine-tuning the frozen copy of the initial weights is swapped in, see cmalign.training.full_finetune)."""
        if self.reference_network is not None:
            return self._frozen_copy_swapped_in()
        return adapters_disabled(self.network)

    @contextlib.contextmanager
    def _frozen_copy_swapped_in(self) -> Iterator[None]:
        ref, own, offloaded = self.reference_network, self.network, self.reference_offload_device
        if offloaded is not None:  # unsharded offload: its weights live on the CPU between calls
            ref.to(offloaded)
        self.network = ref
        try:
            yield
        finally:
            self.network = own
            if offloaded is not None:
                ref.to("cpu")

    # --- adapter ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    @abstractmethod
    def save_adapter(self, directory: Path) -> None:
        """Write the trained adapter (safetensors) into `directory`."""

    @abstractmethod
    def load_adapter(self, directory: Path) -> None:
        """Load an adapter written by `save_adapter`."""
