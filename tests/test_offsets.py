"""Weight offsets: selection, zero init, purity, gradients, L2, counting.

Runs on synthetic U-Net-shaped param trees, plus the real U-Net's abstract params
when ``e4t_jax.models.unet`` is importable.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from e4t_jax.e4t import offsets as off

KINDS = ("lowrank", "multiplicative", "dense")
# (block path, inner dim, cross-attention dim)
BLOCKS = ((("down_blocks_0", "attentions_0"), 8, 6), (("mid_block", "attentions_0"), 16, 6),
          (("up_blocks_1", "attentions_2"), 8, 6))


def _attention(rng, query_dim, kv_dim, dtype):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return {"to_q": {"kernel": normal(query_dim, query_dim)}, "to_k": {"kernel": normal(kv_dim, query_dim)},
            "to_v": {"kernel": normal(kv_dim, query_dim)},
            "to_out_0": {"kernel": normal(query_dim, query_dim), "bias": normal(query_dim)}}


def make_unet_params(seed=0, dtype=jnp.float32):
    """A tree shaped like the U-Net's params: attention blocks among other leaves."""
    rng = np.random.default_rng(seed)
    flat = {("conv_in", "kernel"): jnp.asarray(rng.standard_normal((3, 3, 4, 8)), dtype),
            ("conv_in", "bias"): jnp.zeros((8,), dtype)}
    for block, dim, cross_dim in BLOCKS:
        block_tree = {
            "proj_in": {"kernel": jnp.asarray(rng.standard_normal((dim, dim)), dtype), "bias": jnp.zeros((dim,), dtype)},
            "transformer_blocks_0": {
                "attn1": _attention(rng, dim, dim, dtype),
                "attn2": _attention(rng, dim, cross_dim, dtype),
                "norm1": {"scale": jnp.ones((dim,), dtype), "bias": jnp.zeros((dim,), dtype)},
                "ff": {"net_0": {"proj": {"kernel": jnp.asarray(rng.standard_normal((dim, 4 * dim)), dtype)}}},
            },
        }
        for path, leaf in traverse_util.flatten_dict(block_tree).items():
            flat[block + path] = leaf
    return traverse_util.unflatten_dict(flat)


def random_offsets(params, config, seed=1):
    """Offsets of the right structure with every leaf random (nonzero dW)."""
    zero = off.init_offsets(jax.random.PRNGKey(0), params, config)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32), zero)


def get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def expected_delta(kind, offset, kernel):
    kernel = np.asarray(kernel, np.float64)
    if kind == "lowrank":
        return (np.asarray(offset["down"], np.float64) @ np.asarray(offset["up"], np.float64)).reshape(kernel.shape)
    if kind == "multiplicative":
        return kernel * np.asarray(offset["scale"], np.float64)
    return np.asarray(offset["delta"], np.float64)


@pytest.fixture(scope="module")
def params():
    return make_unet_params()


def test_default_selects_qkv_of_self_and_cross_attention(params):
    paths = off.select_paths(params, off.OffsetConfig())
    assert len(paths) == 6 * len(BLOCKS)
    assert all(p[-1] == "kernel" for p in paths)
    assert {p[-3:-1] for p in paths} == {(a, t) for a in ("attn1", "attn2") for t in ("to_q", "to_k", "to_v")}
    assert {p[:2] for p in paths} == {block for block, _, _ in BLOCKS}


@pytest.mark.parametrize("targets", [
    off.SELF_ATTENTION_QKV,
    off.CROSS_ATTENTION_QKV,
    off.SELF_ATTENTION_QKV + off.CROSS_ATTENTION_QKV + off.OUTPUT_PROJECTIONS,
    ("attn2.to_out_0",),
    ("attn2.to_k", "attn2.to_v"),
])
def test_select_paths_picks_exactly_the_targets(params, targets):
    paths = off.select_paths(params, off.OffsetConfig(targets=targets))
    assert sorted(p[-3:-1] for p in paths) == sorted(tuple(t.split(".")) for t in targets for _ in BLOCKS)


def test_longer_target_narrows_selection_and_unknown_target_raises(params):
    paths = off.select_paths(params, off.OffsetConfig(targets=("mid_block.attentions_0.transformer_blocks_0.attn1.to_q",)))
    assert paths == [("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")]
    with pytest.raises(ValueError, match="attn3.to_q"):
        off.select_paths(params, off.OffsetConfig(targets=("attn1.to_q", "attn3.to_q")))
    with pytest.raises(ValueError):
        off.OffsetConfig(kind="additive")


@pytest.mark.parametrize("kind", KINDS)
def test_init_shapes_and_abstract_params(params, kind):
    config = off.OffsetConfig(kind=kind, rank=3)
    offsets = off.init_offsets(jax.random.PRNGKey(0), params, config)
    abstract = off.init_offsets(jax.random.PRNGKey(0), jax.eval_shape(lambda: params), config)
    jax.tree.map(np.testing.assert_array_equal, offsets, abstract)
    leaves = off.offset_leaves(offsets, kind)
    assert sorted(leaves) == sorted(off.select_paths(params, config))
    for path, leaf in leaves.items():
        kernel = get(params, path)
        assert all(x.dtype == jnp.float32 for x in leaf.values())
        if kind == "lowrank":
            assert leaf["down"].shape == (kernel.shape[0], 3) and leaf["up"].shape == (3, kernel.shape[1])
            assert np.all(np.asarray(leaf["up"]) == 0) and np.std(leaf["down"]) > 0
        else:
            assert leaf[off.KINDS[kind].leaves[0]].shape == kernel.shape


@pytest.mark.parametrize("kind", KINDS)
def test_zero_offsets_leave_every_kernel_bit_identical(params, kind):
    config = off.OffsetConfig(kind=kind, targets=off.SELF_ATTENTION_QKV + off.CROSS_ATTENTION_QKV + off.OUTPUT_PROJECTIONS)
    offsets = off.init_offsets(jax.random.PRNGKey(3), params, config)
    new = off.apply_offsets(params, offsets, config)
    flat, new_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new)
    assert flat.keys() == new_flat.keys()
    for path, leaf in flat.items():
        assert jnp.array_equal(new_flat[path], leaf), path
    modified = set(off.select_paths(params, config))
    assert all(new_flat[p] is leaf for p, leaf in flat.items() if p not in modified)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_offsets_is_pure_jittable_and_matches_closed_form(params, kind):
    config = off.OffsetConfig(kind=kind, targets=off.SELF_ATTENTION_QKV + ("attn2.to_out_0",))
    offsets = random_offsets(params, config)
    params_copy = jax.tree.map(np.array, params)
    offsets_copy = jax.tree.map(np.array, offsets)
    new = jax.jit(off.apply_offsets, static_argnums=2)(params, offsets, kind)
    eager = off.apply_offsets(params, offsets, config)
    jax.tree.map(np.testing.assert_array_equal, params, params_copy)
    jax.tree.map(np.testing.assert_array_equal, offsets, offsets_copy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new, eager)
    modified = off.offset_leaves(offsets, kind)
    for path, leaf in traverse_util.flatten_dict(params).items():
        result = np.asarray(get(new, path))
        if path in modified:
            want = np.asarray(leaf, np.float64) + expected_delta(kind, modified[path], leaf)
            np.testing.assert_allclose(result, want, rtol=1e-5, atol=1e-5)
            assert not np.array_equal(result, leaf)
        else:
            np.testing.assert_array_equal(result, leaf)


def test_bfloat16_kernels_stay_bfloat16(params):
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    config = off.OffsetConfig()
    offsets = random_offsets(params16, config)
    new = off.apply_offsets(params16, offsets, config)
    assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(offsets)} == {jnp.dtype(jnp.float32)}


def test_gradients_reach_up_and_only_selected_kernels(params):
    config = off.OffsetConfig(targets=off.CROSS_ATTENTION_QKV)
    offsets = off.init_offsets(jax.random.PRNGKey(0), params, config)
    selected = set(off.select_paths(params, config))
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(5)
    weights = {p: jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for p, x in flat.items()}

    def weighted_sum(offsets, paths):
        new = traverse_util.flatten_dict(off.apply_offsets(params, offsets, config))
        return sum(jnp.sum(new[p] * weights[p]) for p in paths)

    grads = off.offset_leaves(jax.grad(weighted_sum)(offsets, selected), "lowrank")
    for path, grad in grads.items():
        down = np.asarray(get(offsets, path)["down"])
        np.testing.assert_allclose(grad["up"], down.T @ np.asarray(weights[path]), rtol=1e-4, atol=1e-5)
        assert np.abs(grad["up"]).max() > 0
        np.testing.assert_array_equal(grad["down"], 0)  # up is zero at init
    unselected_grads = jax.grad(weighted_sum)(offsets, set(flat) - selected)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(unselected_grads))


@pytest.mark.parametrize("kind", KINDS)
def test_offset_l2_matches_numpy(params, kind):
    config = off.OffsetConfig(kind=kind, rank=2)
    offsets = random_offsets(params, config)
    want = sum(np.sum(expected_delta(kind, leaf, get(params, path)) ** 2)
               for path, leaf in off.offset_leaves(offsets, kind).items())
    got = off.offset_l2(offsets, kind, params)
    assert got.dtype == jnp.float32 and want > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)
    zero = off.init_offsets(jax.random.PRNGKey(0), params, config)
    assert float(off.offset_l2(zero, config, params)) == 0.0


def test_offset_l2_multiplicative_needs_params(params):
    offsets = off.init_offsets(jax.random.PRNGKey(0), params, off.OffsetConfig(kind="multiplicative"))
    with pytest.raises(ValueError, match="unet_params"):
        off.offset_l2(offsets, "multiplicative")
    with pytest.raises(ValueError, match="lowrank"):
        off.apply_offsets(params, offsets, "lowrank")


def test_count_params_and_describe(params):
    config = off.OffsetConfig(rank=4, targets=off.SELF_ATTENTION_QKV + off.CROSS_ATTENTION_QKV + ("attn1.to_out_0",))
    offsets = off.init_offsets(jax.random.PRNGKey(0), params, config)
    want = 0
    for path in off.select_paths(params, config):
        din, dout = get(params, path).shape
        want += 4 * (din + dout)
    assert off.count_params(offsets) == want
    assert off.count_params(jax.eval_shape(lambda: offsets)) == want
    assert off.count_params(params) == sum(x.size for x in jax.tree.leaves(params))
    text = off.describe(offsets)
    assert "lowrank" in text and f"{7 * len(BLOCKS)} kernels" in text and f"{want:,} parameters" in text
    assert "attn1.to_out_0 x3" in text and "rank 4" in text


def test_merge_offsets_materializes_on_host(params):
    config = off.OffsetConfig(kind="dense")
    offsets = random_offsets(params, config)
    merged = off.merge_offsets(params, offsets, config)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(merged))
    jax.tree.map(np.testing.assert_array_equal, merged, off.apply_offsets(params, offsets, config))


def test_real_unet_abstract_params():
    unet = pytest.importorskip("e4t_jax.models.unet")
    from e4t_jax import weights

    config = unet.UNetConfig(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16), layers_per_block=(1, 1), num_attention_heads=(2, 2),
        transformer_layers_per_block=(1, 1), only_cross_attention=(False, False), cross_attention_dim=12,
        norm_num_groups=4)
    abstract = unet.unet_abstract_params(config)
    offset_config = off.OffsetConfig(targets=off.SELF_ATTENTION_QKV + off.CROSS_ATTENTION_QKV + off.OUTPUT_PROJECTIONS)
    paths = off.select_paths(abstract, offset_config)
    # 1 attention in down_blocks_0, 1 in mid_block, 2 in up_blocks_1; 8 kernels each.
    assert len(paths) == 8 * 4
    keys = {weights.torch_key(p) for p in paths}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight" in keys
    offsets = off.init_offsets(jax.random.PRNGKey(0), abstract, offset_config)
    cross_k = get(offsets, ("up_blocks_1", "attentions_1", "transformer_blocks_0", "attn2", "to_k", "kernel"))
    assert cross_k["down"].shape == (12, 4) and cross_k["up"].shape == (4, 8)
    merged = jax.eval_shape(lambda p, o: off.apply_offsets(p, o, "lowrank"), abstract, offsets)
    assert jax.tree.structure(merged) == jax.tree.structure(abstract)
    assert jax.tree.leaves(merged) == jax.tree.leaves(abstract)  # same shapes and dtypes
