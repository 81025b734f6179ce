"""Frozen Stable Diffusion base model in Flax Linen: U-Net, VAE, CLIP text and vision.

Layout conventions shared by every module here:
- images and feature maps are channels-last, ``[B, H, W, C]``;
- token sequences are ``[B, L, D]``;
- a submodule's name is the PyTorch attribute path with list indices joined by ``_``
  (``down_blocks.0.resnets.1`` -> ``down_blocks_0/resnets_1``), so that
  :mod:`e4t_jax.weights` maps diffusers / transformers checkpoints one to one.
"""
