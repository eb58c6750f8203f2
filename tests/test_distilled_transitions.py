"""The distilled samplers' transitions (cmalign.worlds.lcm.distilled) equal to the stock diffusers schedulers' `step()`
loops, driven as the stock pipelines drive them (StableDiffusion(XL)Pipeline for Euler / Euler ancestral /
DDIM, SanaSprintPipeline for SCM), with a fixed nonlinear stand-in for the network, in float64.

To compare the *maths* at 1e-10 the stock schedulers run in float64: their tables (float32 values) are
promoted to float64 after set_timesteps, and the Euler schedulers' `sample.to(torch.float32)` upcast is made a
float64 one; the transitions read the same float32 table values. A second test per family runs the stock
schedulers untouched in float32 (relative agreement at float32 rounding)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, SCMScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_euler_discrete, scheduling_scm
from diffusers.utils.torch_utils import randn_tensor

from cmalign.chain import ChainNoise, run_chain, step_divergences
from cmalign.worlds.lcm.distilled import DDIMTrailingTransition, EulerAncestralTransition, EulerTransition, SCMTransition

SHAPE = (2, 4, 6, 6)
SEED = 11
TOL = 1e-10
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing")


def fake_network(x, t, reference=False):
    """A deterministic nonlinear stand-in for the UNet / transformer: mixes coordinates and depends on t
    (a python number, a 0-d tensor or a per-sample (B,) tensor, all taken as the same value)."""
    tv = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
    tn = tv / 1000.0 if tv > 2 else tv
    out = torch.tanh(x * (0.5 + tn)) + 0.3 * torch.roll(x, 1, dims=-1) * math.cos(3 * tn) + 0.1 * torch.sin(2 * x)
    return out * (0.9 if reference else 1.0)


class FakeWorld:
    """What run_chain needs from a world, with the fake network (reference: a slightly different one)."""

    def __init__(self, transition, alphas_cumprod):
        self.transition, self.alphas_cumprod = transition, alphas_cumprod
        self._ref = False

    def model_output(self, x, t, cond):
        return fake_network(x, t, self._ref)

    @contextlib.contextmanager
    def reference_policy(self):
        self._ref = True
        try:
            yield
        finally:
            self._ref = False


class _Float64Torch:
    """torch, with torch.float32 read as torch.float64 (the Euler schedulers' upcast line)."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def float64_steps(float64=True):
    """The stock step() in float64 (a no-op for float64=False): the Euler schedulers' float32 upcast reads
    float64, and SCMScheduler's noise (drawn float32 as it does) is promoted before it is scaled."""
    if not float64:
        yield
        return

    def randn_float32_then_float64(*args, **kwargs):
        return randn_tensor(*args, **kwargs).to(torch.float64)

    with pytest.MonkeyPatch.context() as m:
        for module in (scheduling_euler_discrete, scheduling_euler_ancestral_discrete):
            m.setattr(module, "torch", _Float64Torch())
        m.setattr(scheduling_scm, "randn_tensor", randn_float32_then_float64)
        yield


def promote(scheduler):
    for name in ("sigmas", "alphas_cumprod", "final_alpha_cumprod"):
        if isinstance(getattr(scheduler, name, None), torch.Tensor):
            setattr(scheduler, name, getattr(scheduler, name).to(torch.float64))
    if isinstance(scheduler, SCMScheduler):
        scheduler.timesteps = scheduler.timesteps.to(torch.float64)
    return scheduler


def stock_unet_loop(scheduler, num_steps, dtype, float64=True):
    """StableDiffusionPipeline's loop (guidance 0: no CFG): latents = randn * init_noise_sigma; for each t:
    input = scale_model_input(latents, t), out = unet(input, t), latents = step(out, t, latents, generator, eta=0).
    Returns the model inputs, each step's noise (as step() draws it), the final latents and the scheduler."""
    scheduler.set_timesteps(num_steps)
    if float64:
        promote(scheduler)
    gen = torch.Generator().manual_seed(SEED)
    latents = randn_tensor(SHAPE, generator=gen, dtype=dtype) * scheduler.init_noise_sigma
    inputs, noises = [], []
    kwargs = {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(latents, t)
        inputs.append(inp)
        peek = torch.Generator().set_state(gen.get_state())
        noises.append(torch.randn(SHAPE, generator=peek, dtype=dtype))  # what an ancestral step() draws
        with float64_steps(float64):
            latents = scheduler.step(fake_network(inp, t), t, latents, generator=gen, **kwargs).prev_sample
    return inputs, noises, latents, scheduler


def chain_rollout(transition, num_steps, abar, noise_dtype=torch.float64):
    world = FakeWorld(transition, abar)
    noise = ChainNoise.draw(SHAPE[0], SHAPE[1:], num_steps, torch.Generator().manual_seed(SEED), dtype=noise_dtype)
    noise = ChainNoise(noise.initial.double(), [z.double() for z in noise.steps])  # run_chain applies initial_state
    timesteps = transition.timesteps(world, num_steps)
    return run_chain(world, None, noise, timesteps, with_reference=True), noise


def max_diff(a, b):
    return float((a.double() - b.double()).abs().max())


SIGMA_FAMILIES = [
    (EulerTransition, EulerDiscreteScheduler, p) for p in ("epsilon", "v_prediction", "sample")
] + [(EulerAncestralTransition, EulerAncestralDiscreteScheduler, p) for p in ("epsilon", "v_prediction")] + [
    (DDIMTrailingTransition, DDIMScheduler, p) for p in ("epsilon", "v_prediction", "sample")]


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cls, scheduler_cls, prediction", SIGMA_FAMILIES,
                         ids=[f"{c.__name__}-{p}" for c, _, p in SIGMA_FAMILIES])
def test_unet_families_equal_the_stock_scheduler_loop_in_float64(cls, scheduler_cls, prediction,
                                                                  num_steps):
    config = dict(SD_CONFIG, prediction_type=prediction)
    transition = cls(config)
    inputs, noises, final, scheduler = stock_unet_loop(scheduler_cls.from_config(config), num_steps, torch.float64)
    # the grid is the scheduler's own, as ints
    assert transition.timesteps(None, num_steps) == [int(t) for t in scheduler.timesteps]
    abar = scheduler_cls.from_config(config).alphas_cumprod.to(torch.float64)
    traj, noise = chain_rollout(transition, num_steps, abar)
    for k, inp in enumerate(inputs):  # every state: the network's input
        assert max_diff(traj.states[k], inp) < TOL, (k, max_diff(traj.states[k], inp))
    assert max_diff(traj.x0, final) < TOL * max(1.0, float(final.abs().max()))
    # the per-step Gaussian reproduces step(): mean + sigma * z = the next state, z the noise step() drew
    for k in range(num_steps - 1):
        t, t_next = traj.timesteps[k], traj.timesteps[k + 1]
        m = transition.denoise(traj_world(transition, abar), inputs[k], t, None, False)
        mean, sigma = transition.step(inputs[k], m, t, t_next, abar)
        assert max_diff(mean + sigma * noises[k], inputs[k + 1]) < TOL
        if transition.deterministic:
            assert sigma == 0.0
            assert traj.sigmas[k] == transition.sigma_floor(t, t_next, abar) > 0  # run_chain used the floor
        else:
            assert sigma > 0 and traj.sigmas[k] == sigma
            assert noise.steps[k].equal(noises[k])  # the chain's fixed noise is the noise step() draws
    # the chain's final-step floor (world abar) agrees with the transition's own noise level of the last input
    assert abs(traj.sigmas[-1] - transition.final_sigma(traj.timesteps[-1], abar)) < 1e-6
    # the reference branch runs through the same transition
    divs = step_divergences(traj, "kl")
    assert divs.shape == (SHAPE[0], num_steps) and bool(torch.isfinite(divs).all()) and float(divs.min()) > 0


def traj_world(transition, abar):
    return FakeWorld(transition, abar)


def test_deterministic_flags():
    assert EulerTransition(SD_CONFIG).deterministic and DDIMTrailingTransition(SD_CONFIG).deterministic
    assert not EulerAncestralTransition(SD_CONFIG).deterministic and not SCMTransition().deterministic


@pytest.mark.parametrize("cls", [EulerTransition, EulerAncestralTransition, DDIMTrailingTransition])
def test_trailing_grids(cls):
    t = cls(dict(SD_CONFIG, timestep_spacing="leading"))  # trailing is the transitions' default
    assert t.timesteps(None, 1) == [999]
    assert t.timesteps(None, 2) == [999, 499]
    assert t.timesteps(None, 4) == [999, 749, 499, 249]
    assert t.timesteps(None, 8) == [999, 874, 749, 624, 499, 374, 249, 124]


def test_ddim_uses_the_schedulers_prev_timestep_when_k_does_not_divide_t():
    t = DDIMTrailingTransition(SD_CONFIG)
    assert t.timesteps(None, 3) == [999, 666, 332]
    assert t.prev_timestep(666, 332) == 333  # t - T // K, not the next grid timestep
    assert t.sigma_floor(666, 332) == math.sqrt(1 - float(t.abar[333]))


def test_euler_initial_state_is_the_pipelines_scaled_latent():
    t = EulerTransition(SD_CONFIG)
    z = torch.ones(1, dtype=torch.float64)
    abar = float(EulerDiscreteScheduler.from_config(SD_CONFIG).alphas_cumprod[999])
    assert abs(float(t.initial_state(z, 4)) - math.sqrt(1 - abar)) < 1e-7


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="karras"):
        EulerTransition(dict(SD_CONFIG, use_karras_sigmas=True))
    with pytest.raises(ValueError, match="sample"):
        EulerAncestralTransition(dict(SD_CONFIG, prediction_type="sample"))
    with pytest.raises(ValueError, match="clip"):
        DDIMTrailingTransition(dict(SD_CONFIG, clip_sample=True))


@pytest.mark.parametrize("cls, scheduler_cls", [(EulerTransition, EulerDiscreteScheduler),
                                                (EulerAncestralTransition, EulerAncestralDiscreteScheduler),
                                                (DDIMTrailingTransition, DDIMScheduler)])
def test_unet_families_match_the_untouched_float32_scheduler(cls, scheduler_cls):
    transition = cls(SD_CONFIG)
    inputs, _, final, _ = stock_unet_loop(scheduler_cls.from_config(SD_CONFIG), 4, torch.float32, float64=False)
    abar = scheduler_cls.from_config(SD_CONFIG).alphas_cumprod.to(torch.float64)
    # the chain in float64 on the float32 noise
    traj, _ = chain_rollout(transition, 4, abar, noise_dtype=torch.float32)
    for k, inp in enumerate(inputs):
        assert max_diff(traj.states[k], inp) < 1e-5 * float(inp.abs().max())
    assert max_diff(traj.x0, final) < 1e-5 * float(final.abs().max())


# ---------------------------------------------------------------------------------------------- SANA-Sprint


def stock_sana_loop(num_steps, float64=True, sigma_data=0.5):
    """SanaSprintPipeline's denoising loop (its lines, around the stock SCMScheduler.step), fake transformer."""
    scheduler = SCMScheduler(sigma_data=sigma_data)
    scheduler.set_timesteps(num_steps, max_timesteps=1.57080, intermediate_timesteps=1.3 if num_steps == 2 else None)
    if float64:
        promote(scheduler)
    scheduler.set_begin_index(0)
    dtype = torch.float64 if float64 else torch.float32
    gen = torch.Generator().manual_seed(SEED)
    latents = randn_tensor(SHAPE, generator=gen, dtype=torch.float32).to(dtype)
    latents = latents * scheduler.config.sigma_data
    inputs, noises = [], []
    for t in scheduler.timesteps[:-1]:
        timestep = t.expand(latents.shape[0])
        latents_model_input = latents / scheduler.config.sigma_data
        inputs.append(latents_model_input)
        scm_timestep = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        scm_timestep_expanded = scm_timestep.view(-1, 1, 1, 1)
        latent_model_input = latents_model_input * torch.sqrt(
            scm_timestep_expanded**2 + (1 - scm_timestep_expanded) ** 2)
        noise_pred = fake_network(latent_model_input, scm_timestep)
        noise_pred = ((1 - 2 * scm_timestep_expanded) * latent_model_input
                      + (1 - 2 * scm_timestep_expanded + 2 * scm_timestep_expanded**2) * noise_pred
                      ) / torch.sqrt(scm_timestep_expanded**2 + (1 - scm_timestep_expanded) ** 2)
        noise_pred = (noise_pred if float64 else noise_pred.float()) * scheduler.config.sigma_data
        peek = torch.Generator().set_state(gen.get_state())
        noises.append(torch.randn(SHAPE, generator=peek).to(dtype))  # step() draws float32 noise
        with float64_steps(float64):
            latents, denoised = scheduler.step(noise_pred, timestep, latents, generator=gen, return_dict=False)
    return inputs, noises, denoised / scheduler.config.sigma_data, scheduler


class TrigFlowAbar:
    """abar(t) = cos(t)^2 for run_chain's final-step floor sqrt(1 - abar[t]) = sin(t) on the continuous grid."""

    def __getitem__(self, t):
        return torch.tensor(math.cos(t) ** 2, dtype=torch.float64)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_scm_equals_the_sana_sprint_loop_in_float64(num_steps):
    transition = SCMTransition()
    inputs, noises, final, scheduler = stock_sana_loop(num_steps)
    assert transition.timesteps(None, num_steps) == [float(t) for t in scheduler.timesteps[:-1]]
    traj, noise = chain_rollout(transition, num_steps, TrigFlowAbar(), noise_dtype=torch.float32)
    for k, inp in enumerate(inputs):
        assert max_diff(traj.states[k], inp) < TOL
    assert max_diff(traj.x0, final) < TOL
    for k in range(num_steps - 1):
        t, t_next = traj.timesteps[k], traj.timesteps[k + 1]
        m = transition.denoise(FakeWorld(transition, None), inputs[k], t, None, False)
        mean, sigma = transition.step(inputs[k], m, t, t_next)
        assert sigma == math.sin(t_next) > 0 and traj.sigmas[k] == sigma
        assert noise.steps[k].equal(noises[k])
        assert max_diff(mean + sigma * noises[k], inputs[k + 1]) < TOL
    assert abs(traj.sigmas[-1] - transition.final_sigma(traj.timesteps[-1])) < 1e-15


def test_scm_grids():
    t = SCMTransition()
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    assert t.timesteps(None, 1) == [f32(1.5708)]
    assert t.timesteps(None, 2) == [f32(1.5708), f32(1.3)]
    assert t.timesteps(None, 4) == [float(v) for v in torch.linspace(1.5708, 0, 5)[:-1]]


def test_scm_matches_the_untouched_float32_loop():
    inputs, _, final, _ = stock_sana_loop(4, float64=False)
    traj, _ = chain_rollout(SCMTransition(), 4, TrigFlowAbar(), noise_dtype=torch.float32)
    for k, inp in enumerate(inputs):
        assert max_diff(traj.states[k], inp) < 1e-5 * float(inp.abs().max())
    assert max_diff(traj.x0, final) < 1e-5 * float(final.abs().max())


# ------------------------------------------------------------------- the stock pipelines themselves (float32)


class _FakeModule(torch.nn.Module):
    """A stand-in UNet / transformer for the stock pipelines: fake_network, recording its calls."""

    def __init__(self, **config):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.w = torch.nn.Parameter(torch.zeros(()))
        self.config = FrozenDict(in_channels=SHAPE[1], **config)
        self.calls = []

    device = property(lambda self: self.w.device)
    dtype = property(lambda self: self.w.dtype)

    def forward(self, x, t=None, timestep=None, guidance=None, **_):
        t = timestep if t is None else t
        self.calls.append((x.clone(), t, guidance))
        return (fake_network(x, t) + self.w,)


def chain_on_pipeline_noise(transition, num_steps, abar):
    world = FakeWorld(transition, abar)
    noise = ChainNoise.draw(SHAPE[0], SHAPE[1:], num_steps, torch.Generator().manual_seed(SEED), dtype=torch.float32)
    noise = ChainNoise(noise.initial.double(), [z.double() for z in noise.steps])  # run_chain applies initial_state
    return run_chain(world, None, noise, transition.timesteps(world, num_steps))


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
@pytest.mark.parametrize("cls, scheduler_cls", [(EulerTransition, EulerDiscreteScheduler),
                                                (EulerAncestralTransition, EulerAncestralDiscreteScheduler),
                                                (DDIMTrailingTransition, DDIMScheduler)])
def test_unet_families_equal_the_stock_stable_diffusion_pipeline(cls, scheduler_cls, num_steps):
    """StableDiffusionPipeline, guidance 0 (the Turbo / Lightning / Hyper-SD setting), output_type latent."""
    from diffusers import StableDiffusionPipeline

    unet = _FakeModule(sample_size=SHAPE[-1], time_cond_proj_dim=None)
    scheduler = scheduler_cls.from_config(SD_CONFIG)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt_embeds=torch.randn(SHAPE[0], 3, 8), num_inference_steps=num_steps, guidance_scale=0.0,
                   height=8 * SHAPE[-2], width=8 * SHAPE[-1], generator=torch.Generator().manual_seed(SEED),
                   output_type="latent").images
    traj = chain_on_pipeline_noise(cls(SD_CONFIG), num_steps, scheduler.alphas_cumprod.to(torch.float64))
    for state, t, (inp, unet_t, _) in zip(traj.states, traj.timesteps, unet.calls, strict=True):
        assert max_diff(state, inp) < 1e-6 * float(inp.abs().max()) and float(unet_t) == t  # same input, same t
    assert max_diff(traj.x0, latents) < 1e-6 * float(latents.abs().max())


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_scm_equals_the_stock_sana_sprint_pipeline(num_steps):
    """SanaSprintPipeline (embedded guidance 4.5, output_type latent: denoised / sigma_data)."""
    from diffusers import SanaSprintPipeline

    transformer = _FakeModule(guidance_embeds_scale=0.1, sample_size=SHAPE[-1], patch_size=1)
    pipe = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                              scheduler=SCMScheduler())
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt_embeds=torch.randn(SHAPE[0], 3, 8), prompt_attention_mask=torch.ones(SHAPE[0], 3),
                   num_inference_steps=num_steps, intermediate_timesteps=1.3 if num_steps == 2 else None,
                   height=32 * SHAPE[-2], width=32 * SHAPE[-1], generator=torch.Generator().manual_seed(SEED),
                   guidance_scale=4.5, use_resolution_binning=False, output_type="latent").images
    transition = SCMTransition()
    traj = chain_on_pipeline_noise(transition, num_steps, TrigFlowAbar())
    for state, t, (inp, u, guidance) in zip(traj.states, traj.timesteps, transformer.calls, strict=True):
        ours, our_u = transition.model_input(state, t)
        assert max_diff(ours, inp) < 1e-6 * float(inp.abs().max()) and abs(float(u[0]) - our_u) < 1e-6
        assert torch.allclose(guidance, torch.full_like(guidance, 0.45))  # guidance_scale * guidance_embeds_scale
    assert max_diff(traj.x0, latents) < 1e-6 * float(latents.abs().max())
