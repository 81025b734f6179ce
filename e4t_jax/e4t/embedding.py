"""Injecting a learned word embedding ``v*`` at the placeholder token and encoding the text.

The placeholder (``S*``) is a token the tokenizer adds; the text encoder's embedding
table is never grown. Instead the token embeddings are computed with the placeholder
ids clamped into the table, and then overwritten with ``v*`` at the placeholder
positions, so one compiled text encoder serves any number of concepts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def inject(token_embeds: jax.Array, input_ids: jax.Array, token_id: int | jax.Array,
           vector: jax.Array) -> jax.Array:
    """Replaces the embeddings at every position whose id is ``token_id``.

    Args:
      token_embeds: ``[B, L, D]`` input embeddings of the text encoder.
      input_ids: ``[B, L]`` int token ids.
      token_id: the placeholder's id (int or scalar array).
      vector: ``[D]`` (one concept for the whole batch) or ``[B, D]`` (per example).

    Returns:
      ``[B, L, D]`` with ``vector`` at the placeholder positions, the rest untouched.
    """
    vector = jnp.broadcast_to(vector.astype(token_embeds.dtype).reshape(-1, token_embeds.shape[-1]),
                              (token_embeds.shape[0], token_embeds.shape[-1]))
    where = (input_ids == token_id)[..., None]
    return jnp.where(where, vector[:, None, :], token_embeds)


def encode_text(text_module, text_params, input_ids: jax.Array,
                overrides: tuple[tuple[int | jax.Array, jax.Array], ...] = ()) -> jax.Array:
    """Runs the CLIP text encoder with learned embeddings injected.

    Args:
      text_module: a :class:`e4t_jax.models.clip.CLIPTextTransformer`.
      text_params: its params.
      input_ids: ``[B, L]`` int32 ids; ids beyond the embedding table (added
        placeholders) are only valid where an override replaces them.
      overrides: ``((token_id, vector), ...)`` with vector ``[D]`` or ``[B, D]``.

    Returns:
      ``[B, L, D]`` last hidden state (the U-Net's ``encoder_hidden_states``).
    """
    vocab = text_params["embeddings"]["token_embedding"]["embedding"].shape[0]
    safe_ids = jnp.minimum(input_ids, vocab - 1)
    embeds = text_module.apply({"params": text_params}, safe_ids, method=text_module.embed_tokens)
    for token_id, vector in overrides:
        embeds = inject(embeds, input_ids, token_id, vector)
    out = text_module.apply({"params": text_params}, input_ids, inputs_embeds=embeds)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out["last_hidden_state"]
