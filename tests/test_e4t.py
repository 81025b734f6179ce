"""The E4T method as pure JAX, on the tiny model: the properties the design promises.

* zero-initialized weight offsets reproduce the base U-Net bit for bit;
* ``v* = v_class + s E(x)`` lands exactly at the placeholder, nothing else moves;
* gradients reach the encoder head and the offsets; the frozen base model is
  bit-identical after training and has no optimizer state;
* training steps lower the loss on real photos (a tuning batch and a pre-training batch);
* U-Net remat changes neither loss nor gradients and lowers the compiled memory;
* micro-batches accumulated in the step give the whole batch's gradient;
* a bfloat16 step stores the frozen weights in half the bytes, keeps float32 trainables
  and a loss close to float32's.

Compilation dominates the run time, so ONE E4T is built and every program is compiled
once (module fixtures) with :data:`COMPILER_OPTIONS`.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from skimage import data as photos

from e4t_jax.conditioning import encode_text, inject
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.e4t.model import build, head_inputs
from e4t_jax.tokenizer import Tokenizer
from e4t_jax.training import steps
from e4t_jax.training.config import OptimizerConfig
from e4t_jax.training.data import augment, center_crop_resize

# LLVM optimization level 0 halves compile time (the programs run for milliseconds);
# the memory-optimized scheduler is what makes remat visible in memory_analysis() on
# CPU: the default, concurrency-optimized one mostly cancels it. Every program in this
# file is compiled with the same options, so every comparison is like for like.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
ENCODER = EncoderConfig(vision_dim=32, unet_dim=32, hidden_dim=32)
BUILT_IN_KINDS = ("lowrank", "multiplicative", "dense")
LEARNING_RATE = 1e-2  # 20 steps of 1e-3 lower the tiny model's loss by only ~5%
TRAIN_STEPS = 20
EVAL_KEYS = [jax.random.PRNGKey(1000 + i) for i in range(4)]  # fixed noise + timesteps
PROMPTS = ["a photo of S*", "a painting of S*"]
_PROGRAMS = {}  # program text -> compiled executable


def compile_fn(fn, *args, donate_argnums=()):
    """``fn`` jitted and compiled for ``args`` with :data:`COMPILER_OPTIONS`; a program
    whose text was compiled before (the same step on two batches of one shape) is
    compiled only once."""
    lowered = jax.jit(fn, donate_argnums=donate_argnums, compiler_options=COMPILER_OPTIONS).lower(*args)
    text = lowered.as_text()
    if text not in _PROGRAMS:
        _PROGRAMS[text] = lowered.compile()
    return _PROGRAMS[text]


def copy_tree(tree):
    """A fresh device copy (a donated state must not alias the E4T's initial params)."""
    return jax.tree.map(jnp.array, tree)


def make_batch(e4t, images):
    """``images``: float32 ``[2, 64, 64, 3]`` in [-1, 1] -> an E4T batch."""
    return {"pixels": jnp.asarray(images), "input_ids": jnp.asarray(e4t.tokenizer.encode(PROMPTS)),
            "index": jnp.arange(len(images), dtype=jnp.int32)}


def config(tiny_model_dir):
    return E4TConfig(model=ModelConfig(base=str(tiny_model_dir), domain_word="face"), encoder=ENCODER)


@pytest.fixture(scope="module")
def e4t(tiny_model_dir):
    return build(config(tiny_model_dir))


@pytest.fixture(scope="module")
def frozen(e4t):
    """The frozen tree on the device once, as a training driver holds it."""
    return jax.device_put(e4t.frozen)


@pytest.fixture(scope="module")
def batches(e4t):
    """Real photos: a pre-training batch of two subjects, a tuning batch of two
    augmented copies of one face."""
    face, cat = photos.astronaut(), photos.chelsea()
    rng = np.random.default_rng(0)
    return {"pretrain": make_batch(e4t, np.stack([center_crop_resize(face, 64), center_crop_resize(cat, 64)])),
            "tune": make_batch(e4t, np.stack([augment(face, rng, 64), augment(face, rng, 64)]))}


@pytest.fixture(scope="module")
def grad_fn(e4t, frozen, batches):
    """Compiled ``(params, frozen, batch, key) -> (grads, metrics)`` of E4T's loss."""
    loss = functools.partial(model_lib.loss, model=e4t.model)
    return compile_fn(jax.grad(loss, has_aux=True), e4t.params, frozen, batches["tune"], EVAL_KEYS[0])


def eval_losses(grad_fn, params, frozen, batch):
    """The loss at each of the fixed :data:`EVAL_KEYS` (same noise and timesteps every call)."""
    return np.array([float(grad_fn(params, frozen, batch, key)[1]["loss"]) for key in EVAL_KEYS])


def train(e4t, frozen, batch, steps_count=TRAIN_STEPS):
    """Runs ``steps_count`` compiled steps (state donated, frozen not) from the initial
    params; returns ``(state, per-step metrics)``."""
    optimizer = steps.make_optimizer(OptimizerConfig(lr=LEARNING_RATE))
    state = steps.TrainState.create(copy_tree(e4t.params), optimizer, jax.random.PRNGKey(0))

    def step(state, frozen, batch):
        return steps.train_step(state, frozen, batch, loss_fn=functools.partial(model_lib.loss, model=e4t.model),
                                optimizer=optimizer)

    step = compile_fn(step, state, frozen, batch, donate_argnums=(0,))
    history = []
    for _ in range(steps_count):
        state, metrics = step(state, frozen, batch)
        history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def tuned(e4t, frozen, batches):
    """20 training steps on the tuning batch, with a host copy of the frozen tree from before."""
    frozen_before = jax.tree.map(np.array, frozen)
    state, history = train(e4t, frozen, batches["tune"])
    return state, history, frozen_before


# ----------------------------------------------------------------------------- offsets


def test_zero_initialized_offsets_reproduce_the_base_unet_bit_for_bit(e4t, frozen):
    config = {kind: offsets_lib.OffsetConfig(
        targets=offsets_lib.SELF_ATTENTION_QKV + offsets_lib.CROSS_ATTENTION_QKV + offsets_lib.OUTPUT_PROJECTIONS,
        kind=kind) for kind in BUILT_IN_KINDS}
    offsets = {kind: offsets_lib.init_offsets(jax.random.PRNGKey(1), frozen.unet, cfg)
               for kind, cfg in config.items()}
    unet = e4t.sd.unet
    forward = jax.jit(lambda params, x, t, context: unet.apply({"params": params}, x, t, context),
                      compiler_options=COMPILER_OPTIONS)
    apply_offsets = jax.jit(offsets_lib.apply_offsets, static_argnums=2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 77, unet.config.cross_attention_dim)), jnp.float32)
    t = jnp.array([10, 700])
    base = np.asarray(forward(frozen.unet, x, t, context))
    assert base.std() > 0.1
    # lowrank: down is random, up = 0, so dW = down @ up is zero although not every leaf is.
    lowrank = offsets_lib.offset_leaves(offsets["lowrank"], "lowrank").values()
    assert all(np.any(np.asarray(o["down"])) and not np.any(np.asarray(o["up"])) for o in lowrank)
    for kind, kind_offsets in offsets.items():
        out = forward(apply_offsets(frozen.unet, kind_offsets, kind), x, t, context)
        assert np.array_equal(np.asarray(out), base), kind


# --------------------------------------------------------------------------- injection


def test_inject_and_encode_text_put_v_star_exactly_at_the_placeholder(e4t, frozen):
    text, text_params = e4t.sd.text, frozen.text
    table = np.asarray(text_params["embeddings"]["token_embedding"]["embedding"])
    placeholder = e4t.model.placeholder_id
    word_id, = e4t.tokenizer.token_ids(e4t.config.model.domain_word)
    np.testing.assert_array_equal(np.asarray(frozen.class_embedding), table[word_id])

    # v* = v_class + s E(x), a different E(x) per example.
    tokens, pooled = head_inputs(e4t.model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.standard_normal((2,) + tokens.shape[1:]), jnp.float32)
    pooled = [jnp.asarray(rng.standard_normal((2, p.shape[1])), jnp.float32) for p in pooled]
    offset = e4t.model.head.apply({"params": e4t.params.head}, tokens, pooled)
    v_star = frozen.class_embedding[None] + e4t.config.encoder.embedding_scale * offset
    assert not np.allclose(v_star[0], v_star[1])

    ids = e4t.tokenizer.encode(["S* in the snow", "a watercolor painting of S* wearing a hat, S*"])
    where = ids == placeholder
    assert where.sum(axis=1).tolist() == [1, 2] and np.argmax(where[0]) != np.argmax(where[1])

    module = text.module
    embeds = module.apply({"params": text_params}, jnp.minimum(ids, table.shape[0] - 1), method=module.embed_tokens)
    injected = np.asarray(inject(embeds, ids, placeholder, v_star))
    for b in range(2):
        placeholder_rows = np.broadcast_to(v_star[b], (where[b].sum(), table.shape[1]))
        np.testing.assert_array_equal(injected[b][where[b]], placeholder_rows)
        np.testing.assert_array_equal(injected[b][~where[b]], table[ids[b][~where[b]]])

    encoded = encode_text(text, text_params, ids, ((placeholder, v_star),))
    reference = module.apply({"params": text_params}, ids, inputs_embeds=injected).last_hidden_state
    np.testing.assert_array_equal(np.asarray(encoded), np.asarray(reference))
    swapped = encode_text(text, text_params, ids, ((placeholder, v_star[::-1]),))
    for b in range(2):  # each example reads its own vector
        assert not np.allclose(np.asarray(swapped[b]), np.asarray(encoded[b]), atol=1e-4)


def test_a_prompt_without_the_placeholder_is_refused_where_one_is_required(e4t):
    placeholder = e4t.config.model.placeholder
    Tokenizer.require_placeholder(["a photo of S*", "S*, oil painting"], placeholder)
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        Tokenizer.require_placeholder(["a photo of S*", "a photo of a face"], placeholder)


# ------------------------------------------------------------------- gradients, frozen


def test_gradients_reach_every_head_leaf_and_the_offsets(e4t, frozen, batches, grad_fn):
    grads, metrics = grad_fn(e4t.params, frozen, batches["tune"], EVAL_KEYS[0])
    assert np.isfinite(float(metrics["loss"]))
    assert jax.tree.structure(grads) == jax.tree.structure(e4t.params)
    for path, g in traverse_util.flatten_dict(grads.head).items():
        assert float(jnp.abs(g).max()) > 0, path
    kernels = offsets_lib.offset_leaves(grads.offsets, e4t.config.offsets)
    assert len(kernels) == len(offsets_lib.select_paths(frozen.unet, e4t.config.offsets))
    for path, g in kernels.items():
        # dW = down @ up with up = 0 at init: dL/d(up) = down^T dL/dW is non-zero, while
        # dL/d(down) = dL/dW up^T = 0 exactly (and so is the L2 term's 2 down (up up^T)).
        assert float(jnp.abs(g["up"]).max()) > 0, path
        assert not np.any(np.asarray(g["down"])), path


def test_tuning_leaves_the_frozen_model_bit_identical(e4t, frozen, tuned):
    state, _, frozen_before = tuned
    assert int(state.step) == TRAIN_STEPS
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(frozen))  # frozen is not donated
    after = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(frozen)))
    for path, before in jax.tree_util.tree_leaves_with_path(frozen_before):
        assert np.array_equal(before, after[path]), jax.tree_util.keystr(path)
    ups = [leaf["up"] for leaf in offsets_lib.offset_leaves(state.params.offsets, e4t.config.offsets).values()]
    assert all(np.any(np.asarray(up)) for up in ups)  # the offsets did train


def test_optimizer_state_covers_only_the_trainable_params(e4t, tuned):
    state, _, _ = tuned
    opt_leaves = jax.tree.leaves(state.opt_state)
    moments = sorted(leaf.shape for leaf in opt_leaves if leaf.ndim)
    trainable_shapes = sorted(leaf.shape for leaf in jax.tree.leaves(e4t.params))
    assert moments == sorted(trainable_shapes * 2)  # Adam's mu and nu, nothing else
    scalars = len(opt_leaves) - len(moments)
    trainable = offsets_lib.count_params(e4t.params)
    assert offsets_lib.count_params(state.opt_state) == 2 * trainable + scalars and scalars <= 2
    assert trainable < offsets_lib.count_params(e4t.frozen.unet) / 5


# ------------------------------------------------------------------------ loss decrease


def assert_loss_falls(grad_fn, e4t, frozen, batch, state):
    before = eval_losses(grad_fn, e4t.params, frozen, batch)
    after = eval_losses(grad_fn, state.params, frozen, batch)
    assert np.all(after < before), (before, after)
    assert after.mean() < 0.9 * before.mean(), (before, after)


def test_training_lowers_the_loss_on_one_face(e4t, frozen, batches, grad_fn, tuned):
    state, history, _ = tuned
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in history)
    assert_loss_falls(grad_fn, e4t, frozen, batches["tune"], state)


def test_training_lowers_the_loss_on_two_photos(e4t, frozen, batches, grad_fn):
    state, history = train(e4t, frozen, batches["pretrain"])
    assert all(np.isfinite(m["loss"]) for m in history)
    assert_loss_falls(grad_fn, e4t, frozen, batches["pretrain"], state)


# ---------------------------------------------------------------------- remat and bf16


def test_remat_gives_the_same_loss_and_gradients_in_less_memory(tiny_model_dir, e4t, frozen, batches, grad_fn):
    remat = build(config(tiny_model_dir), remat=True)
    assert remat.sd.unet.remat and not e4t.sd.unet.remat
    loss = functools.partial(model_lib.loss, model=remat.model)
    args = (e4t.params, frozen, batches["tune"], EVAL_KEYS[0])
    remat_fn = compile_fn(jax.grad(loss, has_aux=True), *args)
    (grads, metrics), (remat_grads, remat_metrics) = grad_fn(*args), remat_fn(*args)
    np.testing.assert_allclose(float(remat_metrics["loss"]), float(metrics["loss"]), rtol=1e-5)
    remat_grads = dict(jax.tree_util.tree_leaves_with_path(remat_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(remat_grads[path], g, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    plain_bytes = grad_fn.memory_analysis().temp_size_in_bytes
    remat_bytes = remat_fn.memory_analysis().temp_size_in_bytes
    assert remat_bytes < 0.9 * plain_bytes, (remat_bytes, plain_bytes)


def test_micro_batches_give_the_whole_batch_gradient(e4t, frozen, batches, grad_fn):
    """E4T's loss over 2 micro-batches of 1, accumulated in the step, is the 2-image batch's."""
    loss = functools.partial(model_lib.loss, model=e4t.model)
    args = (e4t.params, frozen, batches["tune"], EVAL_KEYS[0])
    accumulated = compile_fn(lambda *a: steps._gradients(loss, *a, grad_accum=2), *args)
    (grads, metrics), (micro_grads, micro_metrics) = grad_fn(*args), accumulated(*args)
    np.testing.assert_allclose(float(micro_metrics["loss"]), float(metrics["loss"]), rtol=1e-6)
    micro_grads = dict(jax.tree_util.tree_leaves_with_path(micro_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(micro_grads[path], g, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert accumulated.memory_analysis().temp_size_in_bytes < grad_fn.memory_analysis().temp_size_in_bytes


def _frozen_bytes(frozen) -> dict[str, int]:
    return {name: sum(leaf.nbytes for leaf in jax.tree.leaves(getattr(frozen, name)))
            for name in ("unet", "vae", "text", "vision")}


def test_bfloat16_compute_step_keeps_float32_params_and_a_close_loss(tiny_model_dir, e4t, batches, tuned):
    _, history, _ = tuned
    bf16 = build(config(tiny_model_dir), dtype=jnp.bfloat16)
    assert bf16.sd.unet.dtype == jnp.bfloat16
    # The frozen weights are stored in bfloat16: half the bytes of every frozen module.
    assert _frozen_bytes(bf16.frozen) == {k: v // 2 for k, v in _frozen_bytes(e4t.frozen).items()}
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16.frozen.base)} == {jnp.dtype(jnp.bfloat16)}
    # Same initial params, key and batch as the float32 run's first step.
    state, (metrics,) = train(dataclasses.replace(bf16, params=e4t.params), jax.device_put(bf16.frozen),
                              batches["tune"], steps_count=1)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(state.params))
    # Measured: 1.3690 (bf16) vs 1.3678 (f32). Not equal: the modules really compute in bf16.
    assert np.isfinite(metrics["loss"]) and metrics["loss"] != history[0]["loss"]
    np.testing.assert_allclose(metrics["loss"], history[0]["loss"], rtol=1e-2)

