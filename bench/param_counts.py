"""Parameter counts of E4T's trainable parts at Stable Diffusion 1.5 scale, from shapes only.

Nothing is downloaded, initialized or computed: every count comes from
``jax.eval_shape`` (abstract ``jax.ShapeDtypeStruct`` trees), so this runs in seconds
on any machine. The base model is the SD 1.5 U-Net and, for the encoder's CLIP
branch, OpenCLIP ViT-H/14's vision tower (the encoder the E4T paper uses).

    python bench/param_counts.py

Prints the encoder head (default :class:`EncoderConfig`, text width 768), the weight
offsets for several :class:`OffsetConfig` choices, and the size of a personalized
concept file (``v*`` + the domain offsets + the concept's change of them, float32)
against the full U-Net in float32.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from e4t_jax import presets  # noqa: E402
from e4t_jax.e4t import offsets as offsets_lib  # noqa: E402
from e4t_jax.e4t.encoder import EncoderConfig, EncoderHead  # noqa: E402
from e4t_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer  # noqa: E402
from e4t_jax.models.unet import UNetConfig, unet_abstract_params  # noqa: E402

SD15_UNET = presets.full_size_configs()["unet"]
VIT_H14 = CLIPVisionConfig.from_dict(presets.full_size_configs()["image_encoder"])
QKV = offsets_lib.SELF_ATTENTION_QKV + offsets_lib.CROSS_ATTENTION_QKV
OFFSET_CHOICES = {
    "lowrank r4, q/k/v (default)": offsets_lib.OffsetConfig(),
    "lowrank r4, q/k/v/out": offsets_lib.OffsetConfig(targets=QKV + offsets_lib.OUTPUT_PROJECTIONS),
    "multiplicative, q/k/v": offsets_lib.OffsetConfig(kind="multiplicative"),
    "multiplicative, q/k/v/out": offsets_lib.OffsetConfig(targets=QKV + offsets_lib.OUTPUT_PROJECTIONS,
                                                         kind="multiplicative"),
    "dense, q/k/v": offsets_lib.OffsetConfig(kind="dense"),
    "dense, q/k/v/out": offsets_lib.OffsetConfig(targets=QKV + offsets_lib.OUTPUT_PROJECTIONS, kind="dense"),
}
BYTES_FP32 = 4


def head_abstract_params(encoder: EncoderConfig, unet: UNetConfig, vision: CLIPVisionConfig) -> dict:
    """Shapes of the encoder head's params for this U-Net and vision tower."""
    taps = vision.num_hidden_layers // encoder.layer_stride
    tokens = jax.ShapeDtypeStruct((1, taps, vision.hidden_size), jnp.float32)
    channels = list(unet.block_out_channels) + [unet.block_out_channels[-1]]  # down blocks, then mid block
    pooled = [jax.ShapeDtypeStruct((1, c), jnp.float32) for c in channels] if encoder.use_unet_branch else None
    return jax.eval_shape(EncoderHead(encoder).init, jax.random.key(0), tokens, pooled)["params"]


def vision_abstract_params(vision: CLIPVisionConfig) -> dict:
    pixels = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32)
    return jax.eval_shape(CLIPVisionTransformer(vision).init, jax.random.key(0), pixels)["params"]


def offsets_abstract_params(unet: dict, config: offsets_lib.OffsetConfig) -> dict:
    """Shapes of the weight offsets that ``config`` puts on ``unet`` (nothing allocated)."""
    return jax.eval_shape(lambda key: offsets_lib.init_offsets(key, unet, config), jax.random.key(0))


def megabytes(count: int) -> str:
    return f"{count * BYTES_FP32 / 1e6:,.1f} MB"


def main() -> None:
    unet_config = UNetConfig.from_diffusers(SD15_UNET)
    unet = unet_abstract_params(unet_config)
    encoder = EncoderConfig(text_dim=unet_config.cross_attention_dim)
    head = head_abstract_params(encoder, unet_config, VIT_H14)
    unet_count = offsets_lib.count_params(unet)
    vision_count = offsets_lib.count_params(vision_abstract_params(VIT_H14))
    head_count = offsets_lib.count_params(head)
    taps = VIT_H14.num_hidden_layers // encoder.layer_stride

    print("Frozen base (for scale)")
    print(f"  SD 1.5 U-Net                 {unet_count:>13,}  {megabytes(unet_count):>10} fp32")
    print(f"  CLIP ViT-H/14 vision tower   {vision_count:>13,}  {megabytes(vision_count):>10} fp32")
    print(f"\nEncoder head (vision_dim {encoder.vision_dim}, unet_dim {encoder.unet_dim}, hidden_dim "
          f"{encoder.hidden_dim}, text_dim {encoder.text_dim}, {taps} CLIP taps)")
    rows = {}  # the CLIP taps' projections in one row; then the U-Net branch, fuse, out
    for name in sorted(head, key=lambda n: (n in ("fuse", "out"), n)):
        label = f"{taps} x vision_proj" if name.startswith("vision_proj_") else name
        rows[label] = rows.get(label, 0) + offsets_lib.count_params(head[name])
    for label, count in rows.items():
        print(f"  {label:<28} {count:>13,}")
    print(f"  {'total':<28} {head_count:>13,}  {megabytes(head_count):>10}  ({head_count / unet_count:.2%} of U-Net)")

    v_star = unet_config.cross_attention_dim
    print(f"\nWeight offsets on the SD 1.5 U-Net, and a concept file (v* [{v_star}] + domain + delta offsets, fp32)")
    print(f"  {'offsets':<28} {'kernels':>7} {'params':>13} {'% U-Net':>8} {'concept file':>13} {'+ tuned head':>13}")
    counts = {}
    for name, config in OFFSET_CHOICES.items():
        counts[name] = count = offsets_lib.count_params(offsets_abstract_params(unet, config))
        kernels = len(offsets_lib.select_paths(unet, config))
        concept = 2 * count + v_star
        print(f"  {name:<28} {kernels:>7} {count:>13,} {count / unet_count:>8.2%} {megabytes(concept):>13} "
              f"{megabytes(concept + head_count):>13}")
    default = 2 * counts["lowrank r4, q/k/v (default)"] + v_star
    print(f"\nA full SD 1.5 U-Net in fp32 is {megabytes(unet_count)}; the default concept file "
          f"({megabytes(default)}) is {unet_count / default:,.0f}x smaller.")


if __name__ == "__main__":
    main()
