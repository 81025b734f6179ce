"""Text conditioners: token ids (with token-embedding overrides) -> the U-Net's context.

A conditioner has two operations, which is all a personalization method needs to put a
learned vector at a token (``S*``) without growing the embedding table:

* ``embed(params, ids)``: ``[B, L]`` int ids -> ``[B, L, D]`` input token embeddings;
  ids beyond the table (added placeholders) are clamped into it, to be overwritten;
* ``encode(params, ids, embeds)``: the rest of the encoder -> ``[B, L, Dc]`` context.

:func:`inject` writes a vector at every position of a token id, and :func:`encode_text`
chains embed, inject and encode; one compiled text encoder serves any number of
placeholders.

Which conditioner a model folder gets is decided by ``text_encoder/config.json``'s
``model_type``: one entry of :data:`TEXT_CONDITIONERS` (:func:`register` adds one).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp

from e4t_jax import weights
from e4t_jax.errors import UserError
from e4t_jax.models.clip import CLIPTextTransformer, load_clip_text

PyTree = Any
# (token_id, vector): vector ``[D]`` (one for the whole batch) or ``[B, D]`` (one per example).
Override = tuple[int | jax.Array, jax.Array]


class TextConditioner(Protocol):
    """What :mod:`e4t_jax.pipeline` and the methods on top need from a text encoder."""

    @property
    def width(self) -> int:
        """``D``, the width of the input token embeddings (the learned vectors)."""

    def embed(self, params: PyTree, ids: jax.Array) -> jax.Array:
        """``[B, L]`` int ids -> ``[B, L, D]`` token embeddings (ids clamped into the table)."""

    def encode(self, params: PyTree, ids: jax.Array, embeds: jax.Array) -> jax.Array:
        """``[B, L]`` ids and their ``[B, L, D]`` embeddings -> ``[B, L, Dc]`` context."""


@dataclasses.dataclass(frozen=True)
class CLIPText:
    """transformers' ``CLIPTextModel`` (Stable Diffusion 1.x / 2.x); the context is its
    last hidden state."""

    module: CLIPTextTransformer

    @property
    def width(self) -> int:
        return self.module.config.hidden_size

    def embed(self, params: PyTree, ids: jax.Array) -> jax.Array:
        vocab = params["embeddings"]["token_embedding"]["embedding"].shape[0]
        return self.module.apply({"params": params}, jnp.minimum(ids, vocab - 1), method=self.module.embed_tokens)

    def encode(self, params: PyTree, ids: jax.Array, embeds: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, ids, inputs_embeds=embeds).last_hidden_state


def _load_clip_text(folder: str | os.PathLike, dtype: Any, param_dtype: Any,
                    variant: str | None = None) -> tuple[CLIPText, PyTree]:
    module, params = load_clip_text(folder, dtype, param_dtype=param_dtype, variant=variant)
    return CLIPText(module), params


# ``model_type`` of text_encoder/config.json -> loader(folder, dtype, param_dtype[, variant]) -> (conditioner, params).
TEXT_CONDITIONERS: dict[str, Callable[..., tuple[TextConditioner, PyTree]]] = {"clip_text_model": _load_clip_text}


def register(model_type: str, loader: Callable[..., tuple[TextConditioner, PyTree]]) -> None:
    """Makes :func:`load` read text encoders whose config says ``model_type``.

    ``loader(folder, dtype, param_dtype) -> (conditioner, params)``; a loader that reads
    weight variants (``--variant fp16``) also takes ``variant=`` (and passes it to
    :func:`e4t_jax.weights.load_state_dict`); it is passed only when one is asked for.
    """
    TEXT_CONDITIONERS[model_type] = loader


def load(folder: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
         variant: str | None = None) -> tuple[TextConditioner, PyTree]:
    """The conditioner of a ``text_encoder/`` folder and its params (``variant``: its weight files')."""
    model_type = weights.read_config(folder).get("model_type", "clip_text_model")
    if model_type not in TEXT_CONDITIONERS:
        raise UserError(f"{folder}: no text conditioner for model_type {model_type!r}; "
                         f"known: {sorted(TEXT_CONDITIONERS)} (e4t_jax.conditioning.register adds one)")
    return TEXT_CONDITIONERS[model_type](folder, dtype, param_dtype, **({"variant": variant} if variant else {}))


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


def encode_text(conditioner: TextConditioner, params: PyTree, input_ids: jax.Array,
                overrides: Sequence[Override] = ()) -> jax.Array:
    """Runs the text encoder with learned embeddings injected.

    Args:
      conditioner: the model's :class:`TextConditioner`.
      params: its params.
      input_ids: ``[B, L]`` int32 ids; ids beyond the embedding table (added
        placeholders) are only valid where an override replaces them.
      overrides: ``((token_id, vector), ...)`` with vector ``[D]`` or ``[B, D]``.

    Returns:
      ``[B, L, Dc]`` (the U-Net's ``encoder_hidden_states``).
    """
    embeds = conditioner.embed(params, input_ids)
    for token_id, vector in overrides:
        embeds = inject(embeds, input_ids, token_id, vector)
    return conditioner.encode(params, input_ids, embeds)
