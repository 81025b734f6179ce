"""Noise schedules and samplers against diffusers' PyTorch schedulers (float32, CPU)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from e4t_jax import schedulers

REFERENCE = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}
SCHEDULES = {
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear"),
}
SPACINGS = {
    "leading": dict(timestep_spacing="leading", steps_offset=1),
    "trailing": dict(timestep_spacing="trailing"),
    "linspace": dict(timestep_spacing="linspace"),
}
# Largest sample error seen: 1.4e-6 (float32 rounding; diffusers mixes float32 and float64).
ATOL = 1e-5


def fake_model(x, t, lib):
    """A deterministic stand-in for the U-Net, written once for torch and for jnp."""
    return 0.95 * x + 0.2 * lib.sin(0.01 * t + lib.cos(3.0 * x))


@jax.jit
def sample_jax(sampler: schedulers.Sampler, noise: jax.Array) -> jax.Array:
    """The whole sampling loop, jitted, in ``lax.fori_loop``; the sampler is a jit argument."""
    def body(i, carry):
        x, state = carry
        t = sampler.timesteps[i].astype(jnp.float32)
        output = fake_model(sampler.scale_model_input(state, x, i), t, jnp)
        return sampler.step(state, output, i, x)

    x = noise * sampler.init_noise_sigma
    return jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))[0]


def sample_diffusers(scheduler, noise: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = fake_model(scheduler.scale_model_input(x, t), t.float(), torch)
        x = scheduler.step(output, t, x).prev_sample
    return x.numpy()


@pytest.fixture(scope="module")
def noise():
    return np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32)


def check_against_diffusers(name, num_steps, noise, **config):
    reference = REFERENCE[name](**config)
    reference.set_timesteps(num_steps)
    sampler = schedulers.make_sampler(schedulers.SchedulerConfig.from_diffusers(reference.config), name, num_steps)

    expected_dtype = np.float32 if name == "euler" else np.int32
    assert sampler.timesteps.dtype == expected_dtype
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), reference.timesteps.numpy())
    np.testing.assert_allclose(float(sampler.init_noise_sigma), float(reference.init_noise_sigma), rtol=3e-7)

    expected = sample_diffusers(reference, noise)
    np.testing.assert_allclose(np.asarray(sample_jax(sampler, jnp.asarray(noise))), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name,prediction_type,schedule,spacing", list(itertools.product(
    REFERENCE, ["epsilon", "v_prediction"], SCHEDULES, SPACINGS)))
def test_sampler_matches_diffusers(name, prediction_type, schedule, spacing, noise):
    config = dict(prediction_type=prediction_type, **SCHEDULES[schedule], **SPACINGS[spacing])
    if name == "ddim":
        config.update(clip_sample=False, set_alpha_to_one=False)
    for num_steps in (10, 25):
        check_against_diffusers(name, num_steps, noise, **config)


@pytest.mark.parametrize("name,config", [
    ("ddim", dict(prediction_type="sample", clip_sample=True, clip_sample_range=1.5, set_alpha_to_one=True)),
    ("euler", dict(prediction_type="sample", final_sigmas_type="sigma_min")),
    # 25 steps with sigma_min: the last DPM-Solver++ step stays second order.
    ("dpm++2m", dict(prediction_type="sample", final_sigmas_type="sigma_min")),
])
def test_sampler_options_match_diffusers(name, config, noise):
    for num_steps in (10, 25):
        check_against_diffusers(name, num_steps, noise, **SCHEDULES["scaled_linear"], **config)


def test_missing_spacing_takes_each_diffusers_class_default():
    stable_diffusion = {  # SD 1.x's PNDM scheduler_config.json: no timestep_spacing
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    }
    config = schedulers.SchedulerConfig.from_diffusers(stable_diffusion)
    for name, reference_class in REFERENCE.items():
        reference = reference_class.from_config(stable_diffusion)
        reference.set_timesteps(20)
        sampler = schedulers.make_sampler(config, name, 20)
        np.testing.assert_array_equal(np.asarray(sampler.timesteps), reference.timesteps.numpy())


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_training_quantities_match_ddpm(schedule, noise):
    reference = DDPMScheduler(**SCHEDULES.get(schedule, dict(beta_schedule=schedule)))
    config = schedulers.SchedulerConfig.from_diffusers(reference.config)
    np.testing.assert_allclose(np.asarray(schedulers.alphas_cumprod(config)), reference.alphas_cumprod.numpy(),
                               rtol=1e-6, atol=1e-7)

    x0 = np.random.RandomState(1).randn(*noise.shape).astype(np.float32)
    t = np.array([0, 999], np.int32)
    x0_t, noise_t, t_t = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t).long()
    noisy = schedulers.add_noise(config, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(noisy), reference.add_noise(x0_t, noise_t, t_t).numpy(), atol=1e-6)
    v = schedulers.velocity(config, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(v), reference.get_velocity(x0_t, noise_t, t_t).numpy(), atol=1e-6)


def test_training_target_follows_prediction_type(noise):
    x0, eps, t = jnp.asarray(noise[::-1]), jnp.asarray(noise), jnp.array([10, 500])
    targets = {prediction: schedulers.training_target(schedulers.SchedulerConfig(prediction_type=prediction), x0, eps, t)
               for prediction in schedulers.PREDICTION_TYPES}
    np.testing.assert_array_equal(targets["epsilon"], eps)
    np.testing.assert_array_equal(targets["sample"], x0)
    np.testing.assert_allclose(targets["v_prediction"], schedulers.velocity(schedulers.SchedulerConfig(), x0, eps, t))
    jitted = jax.jit(schedulers.add_noise, static_argnums=0)(schedulers.SchedulerConfig(), x0, eps, t)
    np.testing.assert_allclose(jitted, schedulers.add_noise(schedulers.SchedulerConfig(), x0, eps, t), atol=1e-6)


@pytest.mark.parametrize("config,message", [
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"beta_schedule": "sigmoid"}, "'linear', 'scaled_linear', 'squaredcos_cap_v2'"),
    ({"prediction_type": "flow_prediction"}, "'epsilon', 'v_prediction', 'sample'"),
    ({"timestep_spacing": "karras"}, "'leading', 'trailing', 'linspace'"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
])
def test_unsupported_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        schedulers.SchedulerConfig.from_diffusers(config)


def test_make_sampler_refuses_bad_arguments():
    with pytest.raises(ValueError, match="'ddim', 'euler', 'dpm\\+\\+2m'"):
        schedulers.make_sampler(schedulers.SchedulerConfig(), "heun", 10)
    with pytest.raises(ValueError, match="num_steps"):
        schedulers.make_sampler(schedulers.SchedulerConfig(), "ddim", 0)
