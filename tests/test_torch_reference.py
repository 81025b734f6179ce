"""The PyTorch E4T reference (bench/torch_e4t.py) computes the same loss and gradients as E4T's loss.

Both load the tiny diffusers folder; the head and the offsets start from the same
numbers (the offsets' ``up`` factors made non-zero, so that the weight offsets change
the U-Net and their orientation is tested); the noise and timesteps that the loss
draws inside are recomputed here with ``per_example_noise`` and handed to torch.
"""
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.torch_e4t import TorchE4T, jax_trainables_to_torch  # noqa: E402
from e4t_jax import config as config_lib, weights  # noqa: E402
from e4t_jax.e4t import model as model_lib  # noqa: E402
from e4t_jax.e4t.config import E4TConfig, ModelConfig  # noqa: E402
from e4t_jax.e4t.encoder import EncoderConfig  # noqa: E402
from e4t_jax.schedulers import per_example_noise  # noqa: E402

PROMPTS = ["a photo of S*", "a portrait of S* wearing a hat", "S* in the snow", "a painting of S*"]
# The reference's metric names -> ours (e4t_jax.e4t.losses.total_loss).
METRICS = {"loss": "loss", "diffusion": "diffusion_loss", "emb_reg": "embedding_reg", "offset_reg": "offset_l2"}


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    e4t = model_lib.build(E4TConfig(model=ModelConfig(base=str(tiny_model_dir)),
                                    encoder=EncoderConfig(vision_dim=48, unet_dim=40, hidden_dim=56)))
    rng = np.random.default_rng(0)
    offsets = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.3 * rng.standard_normal(x.shape).astype(np.float32) if path[-1].key == "up" else x,
        e4t.params.offsets)
    trainable = model_lib.E4TParams(head=e4t.params.head, offsets=offsets)
    reference = TorchE4T(tiny_model_dir, config_lib.to_dict(e4t.config.encoder), jax_trainables_to_torch(trainable))
    batch = {"pixels": rng.uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32),
             "input_ids": e4t.tokenizer.encode(PROMPTS), "index": np.arange(4, dtype=np.int32) + 7}
    key = jax.random.key(3)
    loss_and_grad = jax.jit(jax.value_and_grad(functools.partial(model_lib.loss, model=e4t.model), has_aux=True))
    (_, metrics), grads = loss_and_grad(trainable, e4t.frozen, batch, key)
    factor = e4t.sd.downsample_factor
    noise, timesteps = per_example_noise(key, jnp.asarray(batch["index"]), (64 // factor, 64 // factor, 4),
                                         e4t.sd.scheduler.num_train_timesteps)
    return e4t, reference, batch, noise, timesteps, metrics, grads


@pytest.fixture(scope="module")
def torch_run(setup):
    _, reference, batch, noise, timesteps, _, _ = setup
    reference.zero_grad(set_to_none=True)
    input_ids = reference.encode_prompts(PROMPTS)
    _, metrics = reference.loss(torch.from_numpy(batch["pixels"]).permute(0, 3, 1, 2), input_ids,
                                torch.from_numpy(np.array(noise)).permute(0, 3, 1, 2),
                                torch.from_numpy(np.array(timesteps)).long())
    metrics["loss"].backward()
    return input_ids, {k: v.item() for k, v in metrics.items()}


def test_same_token_ids(setup, torch_run):
    np.testing.assert_array_equal(torch_run[0].numpy(), setup[2]["input_ids"])
    assert (torch_run[0] == setup[1].placeholder_id).sum() == len(PROMPTS)


def test_same_loss_and_terms(setup, torch_run):
    jax_metrics = setup[5]
    for name, ours in METRICS.items():
        np.testing.assert_allclose(torch_run[1][name], float(jax_metrics[ours]), atol=1e-4, rtol=1e-5, err_msg=name)
    assert torch_run[1]["offset_reg"] > 0 and torch_run[1]["emb_reg"] > 0


def _assert_grads_close(expected: dict, actual: dict, what: str):
    assert set(expected) == set(actual), what
    scale = max(np.abs(v).max() for v in expected.values())
    assert scale > 0, f"all {what} gradients are zero"
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, atol=2e-5 * scale, rtol=1e-4, err_msg=f"{what} {key}")


def test_same_head_gradients(setup, torch_run):
    _, reference, _, _, _, _, grads = setup
    expected = weights.params_to_state_dict(grads.head)
    actual = {name: p.grad.numpy() for name, p in reference.head.named_parameters()}
    _assert_grads_close(expected, actual, "head")


def test_same_offset_gradients(setup, torch_run):
    _, reference, _, _, _, _, grads = setup
    expected = {weights.torch_key(path[:-1]) + "." + path[-1]: np.asarray(v)
                for path, v in traverse_util.flatten_dict(grads.offsets).items()}
    offsets = reference.offsets
    actual = {f"{name}.{leaf}": getattr(offsets, leaf)[i].grad.numpy()
              for i, name in enumerate(offsets.names) for leaf in ("down", "up")}
    _assert_grads_close(expected, actual, "offsets")


def test_train_step_updates_only_trainables(setup, torch_run):
    _, reference, batch, noise, timesteps, _, _ = setup
    frozen = {k: v.clone() for k, v in reference.state_dict().items()
              if not k.startswith(("head.", "offsets."))}
    before = [p.detach().clone() for p in reference.trainable_parameters()]
    optimizer = reference.make_optimizer(1e-3)
    metrics = reference.train_step(optimizer, torch.from_numpy(batch["pixels"]).permute(0, 3, 1, 2),
                                   torch_run[0], torch.from_numpy(np.array(noise)).permute(0, 3, 1, 2),
                                   torch.from_numpy(np.array(timesteps)).long())
    assert np.isfinite(metrics["loss"])
    assert all(not torch.equal(b, p) for b, p in zip(before, reference.trainable_parameters()))
    after = reference.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert all(p.grad is None for k, p in reference.named_parameters() if not k.startswith(("head.", "offsets.")))
