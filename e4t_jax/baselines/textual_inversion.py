"""Textual Inversion (Gal et al. 2022): learn one word embedding for a placeholder token.

The trainable pytree is ``{"embedding": [D]}``, initialized from a word's embedding;
the objective is the plain text-to-image diffusion loss with that vector injected at
the placeholder's positions. The text encoder's embedding table is never written, so
every other row (every other word) stays bit-identical, and the optimizer keeps state
for that one row only.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from e4t_jax.diffusion import text_to_image_loss
from e4t_jax import conditioning

PyTree = Any


def init_params(text_params: PyTree, init_token_id: int, concepts: int | None = None) -> PyTree:
    """``{"embedding": float32 [D]}``, a copy of ``init_token_id``'s embedding row;
    ``[concepts, D]`` to learn several independent concepts in one batched run."""
    row = jnp.asarray(text_params["embeddings"]["token_embedding"]["embedding"][init_token_id], jnp.float32)
    return {"embedding": row if concepts is None else jnp.tile(row, (concepts, 1))}


def loss(params: PyTree, frozen: PyTree, batch: dict, key: jax.Array, *, sd, token_id: int):
    """The diffusion loss with ``params["embedding"]`` at ``token_id``.

    Args:
      params: ``{"embedding": [D]}``, or ``[C, D]`` for C concepts learned at once.
      frozen: ``{"unet", "vae", "text"}`` of the base model.
      batch: as :func:`e4t_jax.diffusion.text_to_image_loss` (prompts hold the
        placeholder); with C concepts also ``concept`` ``[B]`` int32, the concept of
        each example. Then the loss is the sum over concepts of each one's mean, so
        each embedding gets exactly the gradient of its own single-concept run.
    """
    embedding = params["embedding"]
    if embedding.ndim == 1:
        def encode(text_params, input_ids):
            return conditioning.encode_text(sd.text, text_params, input_ids, ((token_id, embedding),))

        return text_to_image_loss({}, frozen, batch, key, sd=sd, encode_text=encode)

    def encode_each(text_params, input_ids):
        return conditioning.encode_text(sd.text, text_params, input_ids, ((token_id, embedding[batch["concept"]]),))

    value, _ = text_to_image_loss({}, frozen, batch, key, sd=sd, encode_text=encode_each, reduce=False)
    per_concept = jax.ops.segment_sum(value, batch["concept"], embedding.shape[0])
    counts = jax.ops.segment_sum(jnp.ones_like(value), batch["concept"], embedding.shape[0])
    total = jnp.sum(per_concept / jnp.maximum(counts, 1))
    return total, {"loss": total / embedding.shape[0]}
