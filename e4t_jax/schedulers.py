"""Noise schedules and samplers (DDIM, Euler, DPM-Solver++ 2M) as pure JAX functions.

The numbers follow diffusers' ``DDPMScheduler`` (training), ``DDIMScheduler`` (eta=0),
``EulerDiscreteScheduler`` and ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order
2, midpoint, ``lower_order_final``). Everything that depends only on the schedule and
the number of steps is computed once, in NumPy, by :func:`make_sampler`; the per-step
functions only index precomputed ``[N]`` arrays with the loop index ``i`` (which may
be traced), so they run inside ``jax.jit`` / ``lax.fori_loop`` / ``lax.scan``::

    sampler = make_sampler(config, "dpm++2m", 25)
    x = noise * sampler.init_noise_sigma
    state = sampler.init_state(x)

    def body(i, carry):
        x, state = carry
        out = unet(sampler.scale_model_input(state, x, i), sampler.timesteps[i])
        return sampler.step(state, out, i, x)

    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, state))
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SAMPLERS = ("ddim", "euler", "dpm++2m")
# diffusers' default ``timestep_spacing`` differs between scheduler classes.
DEFAULT_SPACING = {"ddim": "leading", "euler": "linspace", "dpm++2m": "linspace"}

# diffusers options that change the schedule in ways we do not implement: they must be off.
_UNSUPPORTED_FLAGS = (
    "rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting", "thresholding",
)
_REQUIRED_VALUES = {"interpolation_type": "linear", "timestep_type": "discrete", "trained_betas": None}


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; choose one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule of a diffusion model, as in a diffusers ``scheduler_config.json``.

    Defaults are diffusers' constructor defaults. Fields that only some diffusers
    classes have keep their meaning there: ``set_alpha_to_one``, ``clip_sample`` and
    ``clip_sample_range`` act on DDIM only (default True as in ``DDIMScheduler``; the
    Stable Diffusion configs set ``clip_sample: false``), ``final_sigmas_type`` on Euler
    and DPM-Solver++. ``timestep_spacing=None`` means the sampler's diffusers default
    (``leading`` for DDIM, ``linspace`` for Euler and DPM-Solver++), as when a config
    without that key is loaded into each diffusers class.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    timestep_spacing: str | None = None
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.timestep_spacing is not None:
            _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "SchedulerConfig":
        """Reads a diffusers scheduler config (the dict of ``scheduler_config.json``).

        The class named in ``_class_name`` does not matter; sampler options such as
        ``solver_order`` or ``algorithm_type`` are ignored (the sampler name chosen in
        :func:`make_sampler` decides them). Raises ``ValueError`` for options that would
        change the noise schedule and are not implemented (``rescale_betas_zero_snr``,
        Karras sigmas, trained betas, thresholding, ...).
        """
        for flag in _UNSUPPORTED_FLAGS:
            if config.get(flag):
                raise ValueError(f"{flag}=True is not supported by e4t_jax.schedulers; set it to false")
        for key, required in _REQUIRED_VALUES.items():
            if config.get(key, required) != required:
                raise ValueError(f"{key}={config[key]!r} is not supported; only {required!r} is")
        if config.get("lambda_min_clipped", -math.inf) != -math.inf:
            raise ValueError("lambda_min_clipped is not supported; only -inf (no clipping) is")
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in fields})


@functools.lru_cache(maxsize=32)
def _alphas_cumprod_np(config: SchedulerConfig) -> np.ndarray:
    """``[T]`` float32, computed as diffusers does (float32 betas, float64 cumprod)."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, steps).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, steps).astype(np.float32) ** 2
    else:  # squaredcos_cap_v2 (GLIDE cosine schedule, betas capped at 0.999)
        alpha_bar = np.cos((np.arange(steps + 1) / steps + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    alphas = np.float32(1) - betas
    cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    cumprod.setflags(write=False)
    return cumprod


def alphas_cumprod(config: SchedulerConfig) -> jax.Array:
    """Cumulative products of ``1 - beta``: ``[num_train_timesteps]`` float32."""
    return jnp.asarray(_alphas_cumprod_np(config))


def _signal_and_noise_scales(config: SchedulerConfig, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)``, float32, shaped ``[B, 1, ..., 1]``."""
    alpha_bar = alphas_cumprod(config)[t].reshape(t.shape + (1,) * (ndim - t.ndim))
    return jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)


def add_noise(config: SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward diffusion ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``.

    x0, noise: ``[B, H, W, C]``; t: ``[B]`` int. Returns ``[B, H, W, C]`` in ``x0.dtype``.
    """
    signal, sigma = _signal_and_noise_scales(config, t, x0.ndim)
    return (signal * x0 + sigma * noise).astype(x0.dtype)


def velocity(config: SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target ``sqrt(a_t) noise - sqrt(1 - a_t) x0``; shapes as :func:`add_noise`."""
    signal, sigma = _signal_and_noise_scales(config, t, x0.ndim)
    return (signal * noise - sigma * x0).astype(x0.dtype)


def training_target(config: SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the denoiser learns to predict, per ``config.prediction_type``: noise, v or x0."""
    if config.prediction_type == "epsilon":
        return noise
    if config.prediction_type == "v_prediction":
        return velocity(config, x0, noise, t)
    return x0


def per_example_noise(key: jax.Array, index: jax.Array, latent_shape: tuple[int, ...],
                      num_train_timesteps: int) -> tuple[jax.Array, jax.Array]:
    """Training noise and timesteps, drawn per example from ``fold_in(key, index[i])``.

    Drawing per global example index makes a training update independent of how the
    batch is split over devices and hosts.

    Args:
      key: the step's PRNG key.
      index: ``[B]`` int32 global example indices.
      latent_shape: ``(h, w, c)`` of one example's latents.

    Returns:
      noise ``[B, h, w, c]`` float32 and timesteps ``[B]`` int32 in ``[0, num_train_timesteps)``.
    """
    def draw(i):
        k_noise, k_t = jax.random.split(jax.random.fold_in(key, i))
        return (jax.random.normal(k_noise, latent_shape, jnp.float32),
                jax.random.randint(k_t, (), 0, num_train_timesteps))
    return jax.vmap(draw)(index)


class SamplerState(NamedTuple):
    """Loop carry of a sampler. ``previous_x0``: DPM-Solver++'s data prediction of the
    previous step (``[B, H, W, C]`` float32); None for the one-step samplers."""

    previous_x0: jax.Array | None


@struct.dataclass
class Sampler:
    """A sampler for a fixed number of steps ``N``: precomputed arrays and pure steps.

    Attributes:
      timesteps: ``[N]`` model-facing timesteps, high to low, as diffusers'
        ``set_timesteps(N)``: int32 for DDIM and DPM-Solver++, float32 for Euler
        (fractional with ``linspace`` spacing).
      init_noise_sigma: ``[]`` float32, the standard deviation of the initial noise.
      coefficients: per-step ``[N]`` float32 arrays, indexed by the loop index.
      name: one of :data:`SAMPLERS`.
      prediction_type: what the model predicts (``epsilon``, ``v_prediction``, ``sample``).
      clip_range: DDIM clips its x0 prediction to ``[-clip_range, clip_range]``; None: off.
    """

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    coefficients: dict[str, jax.Array]
    name: str = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)
    clip_range: float | None = struct.field(pytree_node=False, default=None)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def init_state(self, x: jax.Array) -> SamplerState:
        """The carry before step 0, for samples shaped like ``x``."""
        multistep = self.name == "dpm++2m"
        return SamplerState(previous_x0=jnp.zeros(x.shape, jnp.float32) if multistep else None)

    def scale_model_input(self, state: SamplerState, x: jax.Array, i: jax.Array) -> jax.Array:
        """The model input at step ``i``: ``x / sqrt(sigma_i^2 + 1)`` for Euler, ``x`` otherwise."""
        del state  # the input scaling depends on the step only
        if self.name != "euler":
            return x
        return (x.astype(jnp.float32) / self.coefficients["input_scale"][i]).astype(x.dtype)

    def step(self, state: SamplerState, model_output: jax.Array, i: jax.Array,
             x: jax.Array) -> tuple[jax.Array, SamplerState]:
        """One denoising step from ``timesteps[i]`` to the next one.

        model_output: ``[B, H, W, C]``, the model's prediction at ``timesteps[i]``; x:
        ``[B, H, W, C]`` current sample; i: scalar int (may be traced). Computed in
        float32; returns ``(x_prev, state)`` with ``x_prev`` in ``x.dtype``.
        """
        step_fn = {"ddim": _ddim_step, "euler": _euler_step, "dpm++2m": _dpm_step}[self.name]
        x_prev, state = step_fn(self, state, model_output.astype(jnp.float32), i, x.astype(jnp.float32))
        return x_prev.astype(x.dtype), state


def _variance_preserving_predictions(prediction_type: str, output: jax.Array, x: jax.Array,
                                     alpha: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x0, noise)`` predicted from ``output`` for ``x = alpha x0 + sigma noise``."""
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output, alpha * output + sigma * x
    return output, (x - alpha * output) / sigma


def _ddim_step(sampler: Sampler, state: SamplerState, output, i, x):
    c = {name: values[i] for name, values in sampler.coefficients.items()}
    x0, noise = _variance_preserving_predictions(sampler.prediction_type, output, x, c["alpha"], c["sigma"])
    if sampler.clip_range is not None:
        x0 = jnp.clip(x0, -sampler.clip_range, sampler.clip_range)
    return c["alpha_prev"] * x0 + c["sigma_prev"] * noise, state


def _euler_step(sampler: Sampler, state: SamplerState, output, i, x):
    sigma, sigma_next = sampler.coefficients["sigma"][i], sampler.coefficients["sigma_next"][i]
    if sampler.prediction_type == "epsilon":
        x0 = x - sigma * output
    elif sampler.prediction_type == "v_prediction":
        x0 = output * (-sigma / sampler.coefficients["input_scale"][i]) + x / (sigma**2 + 1)
    else:
        x0 = output
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_next - sigma), state


def _dpm_step(sampler: Sampler, state: SamplerState, output, i, x):
    c = {name: values[i] for name, values in sampler.coefficients.items()}
    x0, _ = _variance_preserving_predictions(sampler.prediction_type, output, x, c["alpha"], c["sigma"])
    correction = c["second_order"] * (x0 - state.previous_x0)
    x_prev = c["sample_scale"] * x + c["x0_scale"] * (x0 + correction)
    return x_prev, SamplerState(previous_x0=x0)


def _spaced_timesteps(config: SchedulerConfig, spacing: str, name: str, num_steps: int) -> np.ndarray:
    """diffusers' ``set_timesteps`` spacing, float64 ``[N]`` (integers except Euler linspace)."""
    total = config.num_train_timesteps
    # DPM-Solver places N + 1 points for linspace / leading spacing and drops the last (t = 0).
    points = num_steps + 1 if name == "dpm++2m" else num_steps
    if spacing == "linspace":
        timesteps = np.linspace(0, total - 1, points)[::-1][:num_steps]
        return timesteps if name == "euler" else timesteps.round()
    if spacing == "leading":
        return (np.arange(points) * (total // points))[::-1][:num_steps] + float(config.steps_offset)
    return np.round(np.arange(total, 0, -total / num_steps)) - 1


def _ddim_coefficients(config: SchedulerConfig, timesteps: np.ndarray) -> dict[str, np.ndarray]:
    alpha_bar = _alphas_cumprod_np(config)
    final_alpha_bar = np.float32(1) if config.set_alpha_to_one else alpha_bar[0]
    # diffusers steps back by T // N whatever the spacing.
    previous = timesteps - config.num_train_timesteps // len(timesteps)
    alpha_bar_t = alpha_bar[timesteps]
    alpha_bar_prev = np.where(previous >= 0, alpha_bar[np.maximum(previous, 0)], final_alpha_bar)
    one = np.float32(1)
    return {"alpha": np.sqrt(alpha_bar_t), "sigma": np.sqrt(one - alpha_bar_t),
            "alpha_prev": np.sqrt(alpha_bar_prev), "sigma_prev": np.sqrt(one - alpha_bar_prev)}


def _sigmas(config: SchedulerConfig, timesteps: np.ndarray) -> np.ndarray:
    """``[N + 1]`` float32 sigmas ``sqrt((1 - a) / a)`` at the timesteps, then the final sigma."""
    alpha_bar = _alphas_cumprod_np(config)
    table = ((1 - alpha_bar) / alpha_bar) ** np.float32(0.5)
    final = table[0] if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    return np.concatenate([sigmas, [final]]).astype(np.float32)


def _euler_coefficients(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    return {"sigma": sigmas[:-1], "sigma_next": sigmas[1:], "input_scale": np.sqrt(sigmas[:-1] ** 2 + 1)}


def _dpm_coefficients(config: SchedulerConfig, sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """DPM-Solver++ (2M, midpoint) as ``x_prev = a x + b (x0 + c (x0 - x0_prev))``."""
    sigmas = sigmas.astype(np.float64)
    alphas = 1 / np.sqrt(sigmas**2 + 1)
    noise_scales = sigmas * alphas
    with np.errstate(divide="ignore"):  # the final sigma may be 0: lambda = +inf
        lambdas = np.log(alphas) - np.log(noise_scales)
    h = lambdas[1:] - lambdas[:-1]
    second_order = np.zeros_like(h)
    second_order[1:] = 0.5 * h[1:] / h[:-1]
    # Step 0 has no history; the last step is first order when the final sigma is 0 or
    # when lower_order_final applies (fewer than 15 steps).
    if config.final_sigmas_type == "zero" or len(h) < 15:
        second_order[-1] = 0.0
    return {"alpha": alphas[:-1], "sigma": noise_scales[:-1], "sample_scale": noise_scales[1:] / noise_scales[:-1],
            "x0_scale": alphas[1:] * -np.expm1(-h), "second_order": second_order}


def make_sampler(config: SchedulerConfig, name: str, num_steps: int) -> Sampler:
    """A :class:`Sampler` matching diffusers' scheduler ``name`` after ``set_timesteps(num_steps)``.

    name: ``"ddim"`` (``DDIMScheduler``, eta=0), ``"euler"`` (``EulerDiscreteScheduler``)
    or ``"dpm++2m"`` (``DPMSolverMultistepScheduler`` with its default dpmsolver++,
    order 2, midpoint, lower_order_final).
    """
    _check_choice("sampler name", name, SAMPLERS)
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must be in [1, {config.num_train_timesteps}]")
    spacing = config.timestep_spacing or DEFAULT_SPACING[name]
    timesteps = _spaced_timesteps(config, spacing, name, num_steps)
    init_noise_sigma = np.float32(1)
    if name == "ddim":
        timesteps = timesteps.astype(np.int32)
        coefficients = _ddim_coefficients(config, timesteps)
    elif name == "euler":
        timesteps = timesteps.astype(np.float32)
        sigmas = _sigmas(config, timesteps)
        coefficients = _euler_coefficients(sigmas)
        init_noise_sigma = sigmas.max()
        if spacing == "leading":
            init_noise_sigma = (init_noise_sigma**2 + 1) ** np.float32(0.5)
    else:
        timesteps = timesteps.astype(np.int32)
        coefficients = _dpm_coefficients(config, _sigmas(config, timesteps))
    clip_range = float(config.clip_sample_range) if name == "ddim" and config.clip_sample else None
    return Sampler(
        timesteps=jnp.asarray(timesteps),
        init_noise_sigma=jnp.asarray(init_noise_sigma, jnp.float32),
        coefficients={key: jnp.asarray(value, jnp.float32) for key, value in coefficients.items()},
        name=name, prediction_type=config.prediction_type, clip_range=clip_range,
    )
