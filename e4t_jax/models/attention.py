"""One attention function behind every module, so faster kernels can be swapped in.

All implementations take and return ``[B, L, H, D]`` arrays (batch, tokens, heads,
head dim) and compute ``softmax(q k^T * scale + bias) v``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      q: ``[B, Lq, H, D]`` queries.
      k: ``[B, Lk, H, D]`` keys.
      v: ``[B, Lk, H, D]`` values.
      mask: optional boolean, broadcastable to ``[B, H, Lq, Lk]``; False entries are
        excluded (e.g. the CLIP text encoder's causal mask).
      scale: logit scale, ``D ** -0.5`` by default.
      upcast: compute the logits and softmax in float32 (diffusers'
        ``upcast_attention`` / ``upcast_softmax``); the output keeps ``q.dtype``.

    Returns:
      ``[B, Lq, H, D]`` in ``q.dtype``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(dtype)
