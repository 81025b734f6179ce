"""The E4T training step in PyTorch, eager: the reference that e4t_jax is timed and checked against.

Same math as :func:`e4t_jax.e4t.model.loss`, built from the stock models:
diffusers ``UNet2DConditionModel``, ``AutoencoderKL`` and ``DDPMScheduler``,
transformers ``CLIPTextModel`` and ``CLIPVisionModel``, all frozen
(``requires_grad_(False)``). What trains is the encoder head (:class:`EncoderHead`,
written here) and low-rank weight offsets on the U-Net's attention projections
(:class:`LowRankOffsets`), applied functionally: each loss call forms
``W + (down @ up)^T`` once and runs the U-Net through ``torch.func.functional_call``.

One loss call does, in NCHW layout:

1. VAE posterior mean x scaling factor (no grad) -> latents;
2. ``add_noise`` with the given noise and timesteps;
3. CLIP vision on the resized, CLIP-normalized image (no grad): the [CLS] token of
   every ``layer_stride``-th layer (e4t_jax's ``"clip"`` vision backbone);
4. the U-Net's down blocks and mid block on the noisy latents with the empty-prompt
   context, read by forward hooks; a hook on ``mid_block`` stops the forward there, so
   the up path is never run;
5. the head -> ``E(x)``; ``v* = v_class + s E(x)`` replaces the placeholder's token
   embedding (a forward hook on ``token_embedding``) -> text encoder -> context;
6. the full U-Net -> MSE against the noise (or velocity) + ``lambda_emb`` x mean
   ``||s E||^2`` + ``lambda_w`` x ``sum ||dW||^2``.

The head and the offsets come from e4t_jax's parameter pytrees (flattened by
:func:`jax_trainables_to_torch`), so both implementations start from the same
numbers. Only the default ``lowrank`` offsets, the encoder with its U-Net branch and
epsilon / v-prediction are implemented; the optional loss mask is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from e4t_jax.e4t.losses import LossConfig
from e4t_jax.training.config import OptimizerConfig
from e4t_jax.models.clip import CLIP_MEAN, CLIP_STD


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Sizes of the encoder head: :class:`e4t_jax.e4t.encoder.EncoderConfig`'s fields plus
    the input widths, which e4t_jax reads from its inputs' shapes."""

    clip_taps: int
    clip_width: int
    unet_widths: tuple[int, ...]
    text_dim: int
    layer_stride: int = 2
    vision_dim: int = 1024
    unet_dim: int = 1024
    hidden_dim: int = 1024
    embedding_scale: float = 0.1
    negative_slope: float = 0.01


class EncoderHead(nn.Module):
    """Projections of the CLIP and U-Net branches and the fusion MLP.

    Attribute names are the Flax ``EncoderHead``'s submodule names, so its params map
    one to one (``vision_proj_0.weight`` ...).
    """

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        for i in range(config.clip_taps):
            setattr(self, f"vision_proj_{i}", nn.Linear(config.clip_width, config.vision_dim))
        for i, width in enumerate(config.unet_widths):
            setattr(self, f"unet_proj_{i}", nn.Linear(width, config.unet_dim))
        self.fuse = nn.Linear(config.vision_dim + config.unet_dim, config.hidden_dim)
        self.out = nn.Linear(config.hidden_dim, config.text_dim)

    def forward(self, clip_tokens: torch.Tensor, unet_pooled: list[torch.Tensor]) -> torch.Tensor:
        """clip_tokens ``[B, T, Dv]``; unet_pooled list of ``[B, c_i]`` -> ``E(x)`` ``[B, text_dim]`` float32."""
        slope = self.config.negative_slope
        clip = torch.stack([getattr(self, f"vision_proj_{i}")(clip_tokens[:, i]) for i in range(clip_tokens.shape[1])])
        unet = torch.stack([getattr(self, f"unet_proj_{i}")(f) for i, f in enumerate(unet_pooled)])
        branches = [F.leaky_relu(clip.mean(0), slope), F.leaky_relu(unet.mean(0), slope)]
        return self.out(F.leaky_relu(self.fuse(torch.cat(branches, dim=-1)), slope))


class LowRankOffsets(nn.Module):
    """``dW = (down @ up)^T`` for each modified U-Net weight ``[Dout, Din]``.

    ``down [Din, r]`` and ``up [r, Dout]`` keep e4t_jax's layout (Flax kernels are
    ``[Din, Dout]``), so they are copied as they are.
    """

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """factors: U-Net state-dict key (``...attn1.to_q.weight``) -> ``(down, up)``."""
        super().__init__()
        self.names = sorted(factors)
        self.down = nn.ParameterList([nn.Parameter(factors[name][0].clone()) for name in self.names])
        self.up = nn.ParameterList([nn.Parameter(factors[name][1].clone()) for name in self.names])

    def patched_weights(self, unet: nn.Module) -> dict[str, torch.Tensor]:
        """``{key: W + dW}`` for :func:`torch.func.functional_call`."""
        base = dict(unet.named_parameters())
        return {name: base[name] + (down @ up).T for name, down, up in zip(self.names, self.down, self.up)}

    def l2(self) -> torch.Tensor:
        """``sum ||down @ up||_F^2`` as ``sum((down^T down) * (up up^T))``, a float32 scalar."""
        return sum(((down.T @ down) * (up @ up.T)).sum() for down, up in zip(self.down, self.up))


class _StopForward(Exception):
    """Raised by the ``mid_block`` hook: the U-Net's up path is not needed for features."""


@contextlib.contextmanager
def _hooks(*pairs):
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TorchE4T(nn.Module):
    """Frozen base model + trainable head and offsets; :meth:`loss` is E4T's objective."""

    def __init__(self, folder: str | Path, encoder: dict, trainable: dict[str, np.ndarray], *,
                 placeholder: str = "S*", domain_word: str = "face", lambda_emb: float = LossConfig.lambda_emb,
                 lambda_w: float = LossConfig.lambda_w):
        """Loads and freezes ``unet/``, ``vae/``, ``text_encoder/``, ``image_encoder/`` of a
        diffusers model folder (plus ``tokenizer/``, ``scheduler/``).

        Args:
          encoder: ``e4t_jax.config.to_dict`` of the e4t_jax ``EncoderConfig`` (``"clip"``
            backbone, U-Net branch on).
          trainable: initial head and offsets, from :func:`jax_trainables_to_torch`.
        """
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AddedToken, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

        folder = Path(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        self.vae = AutoencoderKL.from_pretrained(folder / "vae")
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder")
        self.vision = CLIPVisionModel.from_pretrained(folder / "image_encoder")
        for frozen in (self.unet, self.vae, self.text, self.vision):
            frozen.requires_grad_(False).eval()
        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.scheduler.config.prediction_type!r} is not implemented here")
        if not encoder.get("use_unet_branch", True) or encoder.get("vision", "clip") != "clip":
            raise ValueError("only the encoder with the CLS-token CLIP backbone and its U-Net branch is implemented here")

        vision, channels = self.vision.config, list(self.unet.config.block_out_channels)
        fields = {f.name for f in dataclasses.fields(HeadConfig)}
        self.head = EncoderHead(HeadConfig(
            clip_taps=vision.num_hidden_layers // encoder["layer_stride"], clip_width=vision.hidden_size,
            unet_widths=tuple(channels + channels[-1:]),
            **{k: v for k, v in encoder.items() if k in fields}))
        self.head.load_state_dict({k[len("head."):]: torch.from_numpy(np.array(v)) for k, v in trainable.items()
                                   if k.startswith("head.")})
        factors = {k[len("offsets."):]: torch.from_numpy(np.array(v)) for k, v in trainable.items()
                   if k.startswith("offsets.")}
        names = sorted({k.rsplit(".", 1)[0] for k in factors})
        self.offsets = LowRankOffsets({name: (factors[f"{name}.down"], factors[f"{name}.up"]) for name in names})

        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        word_ids = self.tokenizer(domain_word, add_special_tokens=False).input_ids
        self.tokenizer.add_tokens([AddedToken(placeholder, normalized=False)])
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(placeholder)
        self.lambda_emb, self.lambda_w = lambda_emb, lambda_w
        self.register_buffer("class_embedding", self.text.get_input_embeddings().weight[word_ids[0]].clone())
        with torch.no_grad():
            self.register_buffer("empty_context", self.text(self.encode_prompts([""])).last_hidden_state)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) + list(self.offsets.parameters())

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``[B, 77]`` int64, padded as diffusers' pipeline."""
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_text(self, input_ids: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        """Text encoder with ``word`` ``[B, D]`` at the placeholder positions -> ``[B, L, D]``."""
        where = (input_ids == self.placeholder_id)[..., None]

        def inject(module, args, output):
            return torch.where(where, word[:, None, :].to(output.dtype), output)

        vocab = self.text.get_input_embeddings().num_embeddings
        with _hooks((self.text.get_input_embeddings(), inject)):
            return self.text(input_ids.clamp(max=vocab - 1)).last_hidden_state

    def unet_features(self, weights: dict, noisy: torch.Tensor, timesteps: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every down block and of the mid block (``[B, c, h, w]``), empty-prompt context."""
        features = []

        def keep_down(module, args, output):
            features.append(output[0])

        def keep_mid_and_stop(module, args, output):
            features.append(output)
            raise _StopForward

        context = self.empty_context.expand(noisy.shape[0], -1, -1)
        pairs = [(block, keep_down) for block in self.unet.down_blocks] + [(self.unet.mid_block, keep_mid_and_stop)]
        with _hooks(*pairs), contextlib.suppress(_StopForward):
            torch.func.functional_call(self.unet, weights, (noisy, timesteps, context))
        return features

    def clip_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> [CLS] tokens of every stride-th layer ``[B, T, Dv]``."""
        size = self.vision.config.image_size
        x = F.interpolate((pixels + 1) / 2, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        states = self.vision(x, output_hidden_states=True).hidden_states
        stride = self.head.config.layer_stride
        return torch.stack([h[:, 0] for h in states[stride::stride]], dim=1)

    def loss(self, pixels: torch.Tensor, input_ids: torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """E4T's loss on one batch.

        Args:
          pixels: ``[B, 3, H, W]`` float32 in [-1, 1].
          input_ids: ``[B, L]`` int64 prompts with the placeholder.
          noise: ``[B, 4, h, w]`` float32; timesteps: ``[B]`` int64.

        Returns:
          ``(loss, metrics)`` float32 scalars (e4t_jax names them ``loss``, ``diffusion_loss``,
          ``embedding_reg``, ``offset_l2``).
        """
        weights = self.offsets.patched_weights(self.unet)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
            tokens = self.clip_tokens(pixels)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        pooled = [f.mean(dim=(2, 3)) for f in self.unet_features(weights, noisy, timesteps)]
        scaled = self.head.config.embedding_scale * self.head(tokens, pooled)
        context = self.encode_text(input_ids, self.class_embedding[None] + scaled)
        prediction = torch.func.functional_call(self.unet, weights, (noisy, timesteps, context)).sample
        if self.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        diffusion = F.mse_loss(prediction, target)
        emb_reg = scaled.square().sum(-1).mean()
        w_reg = self.offsets.l2()
        loss = diffusion + self.lambda_emb * emb_reg + self.lambda_w * w_reg
        return loss, {"loss": loss, "diffusion": diffusion, "emb_reg": emb_reg, "offset_reg": w_reg}

    def draw_noise(self, pixels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise ``[B, c, H / f, W / f]`` (f: the VAE's downsampling) and timesteps ``[B]``.

        Args:
          pixels: ``[B, 3, H, W]``, the batch the noise is for (only its shape is read).
        """
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        b, _, height, width = pixels.shape
        shape = (b, self.vae.config.latent_channels, height // factor, width // factor)
        noise = torch.randn(shape, generator=generator)
        return noise, torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)

    def make_optimizer(self, lr: float, weight_decay: float = OptimizerConfig.weight_decay) -> torch.optim.AdamW:
        """AdamW on the head and offsets only, as ``e4t_jax.training.steps.make_optimizer``'s defaults."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr, weight_decay=weight_decay)

    def train_step(self, optimizer: torch.optim.Optimizer, pixels: torch.Tensor, input_ids: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor,
                   clip_norm: float = OptimizerConfig.clip_norm) -> dict[str, float]:
        """Forward, backward, global-norm clipping and one AdamW update."""
        optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.loss(pixels, input_ids, noise, timesteps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), clip_norm)
        optimizer.step()
        return {k: v.item() for k, v in metrics.items()}


def jax_trainables_to_torch(trainable) -> dict[str, np.ndarray]:
    """e4t_jax's ``E4TParams`` (head and offsets) -> the flat dict :class:`TorchE4T` takes.

    Keys: ``head.<PyTorch key>`` (``head.fuse.weight`` ...) and
    ``offsets.<U-Net weight key>.down`` / ``.up`` (factors in their Flax layout).
    """
    from flax import traverse_util

    from e4t_jax import weights

    state = {f"head.{k}": v for k, v in weights.params_to_state_dict(trainable.head).items()}
    for path, value in traverse_util.flatten_dict(trainable.offsets).items():
        state[f"offsets.{weights.torch_key(path[:-1])}.{path[-1]}"] = np.array(value, np.float32)
    return state
