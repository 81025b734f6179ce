"""DreamBooth (Ruiz et al. 2023) and TI+DreamBooth: fine-tune the U-Net on a few images.

The trainable pytree is a selection of the model's own parts::

    {"unet": U-Net params,            # full fine-tune, or instead
     "lora": low-rank offsets,        # e4t_jax.e4t.offsets, kind "lowrank" (LoRA-style)
     "text": text-encoder params,     # optional (--train-text-encoder)
     "embedding": float32 [D]}        # optional: the placeholder's row (TI+DreamBooth)

and the objective is the plain text-to-image diffusion loss
(:func:`e4t_jax.diffusion.text_to_image_loss`) on the instance images with the
instance prompt ("a photo of S* dog"), plus ``prior_weight`` times the same loss on
class images with the class prompt ("a photo of a dog"): the prior-preservation loss,
which keeps the model from forgetting what the class looks like. Both halves run in
one U-Net call over the concatenated batch.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from e4t_jax import conditioning
from e4t_jax.diffusion import text_to_image_loss
from e4t_jax.e4t import offsets as offsets_lib

PyTree = Any
LORA_TARGETS = offsets_lib.SELF_ATTENTION_QKV + offsets_lib.CROSS_ATTENTION_QKV + offsets_lib.OUTPUT_PROJECTIONS


def lora_config(rank: int) -> offsets_lib.OffsetConfig:
    """Low-rank offsets on q, k, v and out of every attention layer (the projections diffusers' LoRA trains)."""
    return offsets_lib.OffsetConfig(targets=LORA_TARGETS, kind="lowrank", rank=rank)


def init_params(base: PyTree, key: jax.Array, *, lora_rank: int = 0, train_text: bool = False,
                init_token_id: int | None = None) -> PyTree:
    """The trainable pytree (float32, own buffers: a train step may donate it).

    Args:
      base: ``{"unet", "vae", "text"}`` of the base model.
      key: draws the low-rank offsets' ``down`` factors (``up`` starts at zero: step 0 is the base model).
      lora_rank: 0 trains the whole U-Net (``"unet"``); R > 0 trains rank-R offsets (``"lora"``) instead.
      train_text: also train the text encoder (``"text"``).
      init_token_id: TI+DreamBooth: also learn ``"embedding"`` ``[D]``, a copy of this token's row.
    """
    def own(tree):
        return jax.tree.map(lambda leaf: jnp.array(leaf, jnp.float32), tree)

    params = ({"lora": offsets_lib.init_offsets(key, base["unet"], lora_config(lora_rank))} if lora_rank
              else {"unet": own(base["unet"])})
    if train_text:
        params["text"] = own(base["text"])
    if init_token_id is not None:
        params["embedding"] = own(base["text"]["embeddings"]["token_embedding"]["embedding"][init_token_id])
    return params


def frozen_params(base: PyTree, params: PyTree) -> PyTree:
    """What the loss reads without training: ``base`` minus what ``params`` replaces (the U-Net stays under LoRA)."""
    return {name: tree for name, tree in base.items() if name not in params}


def unet_params(params: PyTree, frozen: PyTree) -> PyTree:
    """The U-Net the loss runs: the trained one, the frozen one with the offsets applied, or the frozen one."""
    if "lora" in params:
        return offsets_lib.apply_offsets(frozen["unet"], params["lora"], "lowrank")
    return params["unet"] if "unet" in params else frozen["unet"]


def loss(params: PyTree, frozen: PyTree, batch: dict, key: jax.Array, *, sd, token_id: int | None = None,
         prior_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """Instance loss + ``prior_weight`` x class (prior-preservation) loss.

    Args:
      params: the trainable pytree (:func:`init_params`).
      frozen: the rest of ``{"unet", "vae", "text"}`` (:func:`frozen_params`).
      batch: ``pixels`` float32 ``[B, H, W, 3]`` in [-1, 1], ``input_ids`` int32 ``[B, 77]``,
        ``index`` int32 ``[B]`` (distinct per row: each row's noise is drawn from it) and
        ``prior`` bool ``[B]``: True on the class rows (class images, class prompt), False
        on the instance rows. A batch without class rows is plain DreamBooth without
        prior preservation.
      key: this step's RNG key.
      sd: the static :class:`e4t_jax.pipeline.StableDiffusion`.
      token_id: the placeholder's id, where ``params["embedding"]`` is injected (TI+DreamBooth).
      prior_weight: the class loss's weight (DreamBooth's lambda, 1 in the paper).

    Returns:
      ``(loss, {"loss", "instance_loss", "prior_loss"})``, float32 scalars (a mean over
      zero rows counts 0).
    """
    model = {"unet": unet_params(params, frozen), "text": params["text"] if "text" in params else frozen["text"]}
    encode = None
    if "embedding" in params:
        def encode(text_params, input_ids):
            return conditioning.encode_text(sd.text, text_params, input_ids, ((token_id, params["embedding"]),))

    per_example, _ = text_to_image_loss(model, {"vae": frozen["vae"]}, batch, key, sd=sd, encode_text=encode,
                                        reduce=False)
    prior = batch["prior"].astype(jnp.float32)

    def mean(weights):
        return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    instance_loss, prior_loss = mean(1.0 - prior), mean(prior)
    total = instance_loss + prior_weight * prior_loss
    return total, {"loss": total, "instance_loss": instance_loss, "prior_loss": prior_loss}
