"""OpenCLIP vision checkpoints: parity with open_clip_torch's own forward, key mapping, files, errors.

open_clip's package ``__init__`` imports torchvision for its image transforms, and no
torchvision on PyPI loads beside the CPU build of torch the tests use (its compiled ops
link CUDA torch; the import then fails, and breaks transformers' imports with it). The
model classes need torchvision only for ``FrozenBatchNorm2d`` (freezing ResNet towers),
so :func:`_open_clip_model` imports ``open_clip.model`` without running the package's
``__init__``, with that one name stubbed where torchvision is absent. Everything computed
here is open_clip's code.
"""
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from e4t_jax import weights
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import vision as vision_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.models import clip
from test_clip import _randomize  # the perturbation of the transformers parity tests

OPENAI_STATS = {"mean": list(clip.CLIP_MEAN), "std": list(clip.CLIP_STD)}
# 3 layers of width 32 (4 heads of 8), MLP 80 wide (mlp_ratio 2.5), 4 x 4 patches of 8 pixels.
VISION_CFG = {"image_size": 32, "layers": 3, "width": 32, "head_width": 8, "mlp_ratio": 2.5, "patch_size": 8}
TEXT_CFG = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}


def _open_clip_model() -> types.ModuleType:
    """``open_clip.model`` (open_clip_torch's ``CLIP``, ``CLIPVisionCfg``, ...), torchvision or not.

    Raises:
      ModuleNotFoundError: open_clip_torch is not installed (the test fails, not skips).
    """
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip.model"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ModuleNotFoundError("open_clip_torch is missing: pip install --no-deps -r tests/requirements-no-deps.txt")
    sys.modules["open_clip"] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
    importlib.import_module("open_clip.hf_model")  # imports transformers while torchvision is what it is
    stubs = {} if importlib.util.find_spec("torchvision") else _torchvision_stub()
    sys.modules.update(stubs)
    try:
        return importlib.import_module("open_clip.model")
    finally:
        for name in stubs:
            del sys.modules[name]


def _torchvision_stub() -> dict[str, types.ModuleType]:
    """``torchvision.ops.misc.FrozenBatchNorm2d``, the one torchvision name open_clip's models import."""
    modules = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}

    class FrozenBatchNorm2d(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise NotImplementedError("torchvision is not installed")

    modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    return modules



def _open_clip_config(quick_gelu: bool, vision_cfg: dict = VISION_CFG, **preprocess) -> dict:
    """An ``open_clip_config.json`` as on the Hub."""
    model_cfg = {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": TEXT_CFG}
    return {"model_cfg": {**model_cfg, "quick_gelu": quick_gelu} if quick_gelu else model_cfg,
            "preprocess_cfg": {**OPENAI_STATS, **preprocess}}


def _write(folder, state: dict[str, np.ndarray], config: dict, name: str = "open_clip_model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / name))
    (folder / weights.OPENCLIP_CONFIG).write_text(json.dumps(config))
    return folder


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module", params=[False, True], ids=["gelu", "quick_gelu"])
def reference(request, tmp_path_factory):
    """A tiny random open_clip ``CLIP`` saved as an OpenCLIP Hub folder, and our loaded tower."""
    open_clip_model = _open_clip_model()
    torch.manual_seed(0)
    model = _randomize(open_clip_model.CLIP(16, vision_cfg=open_clip_model.CLIPVisionCfg(**VISION_CFG),
                                            text_cfg=open_clip_model.CLIPTextCfg(**TEXT_CFG), quick_gelu=request.param))
    folder = _write(tmp_path_factory.mktemp("open_clip"), _state(model), _open_clip_config(request.param))
    module, params = clip.load_clip_vision(folder, with_projection=True)
    return dict(model=model, folder=folder, module=module, params=params, quick_gelu=request.param)


def test_config_is_read_from_open_clip_config(reference):
    assert reference["module"].config == clip.CLIPVisionConfig(
        hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, image_size=32,
        patch_size=8, hidden_act="quick_gelu" if reference["quick_gelu"] else "gelu", projection_dim=16)


def test_matches_open_clip_forward(reference):
    """Every layer's tokens, the pooled [CLS] and the image embedding, against open_clip's forward."""
    model, module = reference["model"], reference["module"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = model.visual.forward_intermediates(pixels, output_fmt="NLC", output_extra_tokens=True)
        layers = [torch.cat(parts, dim=1) for parts in zip(theirs["image_intermediates_prefix"],
                                                          theirs["image_intermediates"])]
        expected = [model.visual._embeds(pixels)] + layers
        pooled, _ = model.visual._pool(layers[-1])
        image_embeds = model.encode_image(pixels)
    ours = module.apply({"params": reference["params"]}, pixels.permute(0, 2, 3, 1).numpy(), output_hidden_states=True)
    assert len(ours.hidden_states) == len(expected) == VISION_CFG["layers"] + 1
    errors = [np.abs(np.asarray(mine) - their.numpy()).max() for mine, their in zip(ours.hidden_states, expected)]
    errors += [np.abs(np.asarray(ours.pooler_output) - pooled.numpy()).max(),
               np.abs(np.asarray(ours.image_embeds) - image_embeds.numpy()).max()]
    print(f"max abs errors (layers 0..{VISION_CFG['layers']}, pooled, image embedding): {errors}")
    assert max(errors) < 1e-4, errors
    assert image_embeds.abs().min() > 0 and pooled.abs().mean() > 0.1  # nothing trivially zero


def test_backbone_and_bare_file_load_the_same(reference, tmp_path):
    backbone, params = vision_lib.load("clip", reference["folder"])
    assert (backbone.num_layers, backbone.width) == (3, 32)
    layers, pooled = backbone(params, jnp.zeros((1, 48, 48, 3)))
    assert layers.shape == (1, 3, 32) and pooled.shape == (1, 32)
    # One safetensors file with visual.* keys only, named anyhow, with the config beside it.
    state = {k: v for k, v in weights.read_safetensors(reference["folder"] / "open_clip_model.safetensors").items()
             if k.startswith("visual.")}
    folder = _write(tmp_path / "bare", state, _open_clip_config(reference["quick_gelu"]), "vit.safetensors")
    for source in (folder, folder / "vit.safetensors"):
        _, loaded = clip.load_clip_vision(source, with_projection=True)
        for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(loaded),
                                     jax.tree_util.tree_leaves_with_path(reference["params"])):
            np.testing.assert_array_equal(a, b, err_msg=str(path))


@pytest.mark.parametrize("reference", [True], indirect=True, ids=["quick_gelu"])
def test_e4t_builds_on_an_open_clip_vision_source(reference, tiny_model_dir):
    e = model_lib.build(E4TConfig(model=ModelConfig(base=str(tiny_model_dir), vision_source=str(reference["folder"])),
                                  encoder=EncoderConfig(vision_dim=16, unet_dim=16, hidden_dim=16)))
    assert (e.model.vision.num_layers, e.model.vision.width) == (3, 32)
    expected = {key: value for key, value in reference["params"].items() if key != "visual_projection"}
    jax.tree.map(np.testing.assert_array_equal, e.frozen.vision, expected)


def test_missing_and_unexpected_keys_are_named(reference, tmp_path):
    state = weights.read_safetensors(reference["folder"] / "open_clip_model.safetensors")
    del state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    state["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(32, np.float32)  # layer scale: not ours
    folder = _write(tmp_path / "broken", state, _open_clip_config(reference["quick_gelu"]))
    with pytest.raises(weights.CheckpointError) as error:
        clip.load_clip_vision(folder)
    message = str(error.value)
    assert "OpenCLIP vision encoder" in message and "open_clip_config.json beside the weights" in message
    assert "3 missing keys" in message and "encoder.layers.1.self_attn.q_proj.weight" in message
    assert "visual.transformer.resblocks.0.ls_1.gamma" in message


def test_pickles_are_refused_not_loaded(tmp_path):
    (tmp_path / weights.OPENCLIP_CONFIG).write_text(json.dumps(_open_clip_config(False)))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"never unpickled")
    for source in (tmp_path, tmp_path / "open_clip_pytorch_model.bin"):
        with pytest.raises(weights.CheckpointError, match="never loads pickles.*convert it") as error:
            clip.load_clip_vision(source)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("vision_cfg, preprocess, match", [
    ({**VISION_CFG, "attentional_pool": True}, {}, "attentional_pool=True"),
    ({**VISION_CFG, "pool_type": "avg"}, {}, "pool_type='avg'"),
    ({**VISION_CFG, "ls_init_value": 1e-5}, {}, "ls_init_value"),
    ({**VISION_CFG, "timm_model_name": "vit_base_patch16_224"}, {}, "timm_model_name"),
    ({**VISION_CFG, "layers": [3, 4, 6, 3]}, {}, "a ResNet"),
    ({**VISION_CFG, "image_size": [32, 48]}, {}, "Non-square"),
    (VISION_CFG, {"mean": [0.5, 0.5, 0.5]}, "normalizes images with mean"),
])
def test_unsupported_towers_are_refused(vision_cfg, preprocess, match):
    with pytest.raises(weights.CheckpointError, match=match):
        clip.CLIPVisionConfig.from_openclip(_open_clip_config(False, vision_cfg, **preprocess))


def test_config_defaults_and_norm_eps():
    config = clip.CLIPVisionConfig.from_openclip(
        {"embed_dim": 1024, "quick_gelu": True, "vision_cfg": {"width": 1280, "layers": 32, "head_width": 80,
                                                                "patch_size": 14, "norm_kwargs": {"eps": 1e-6}}})
    assert config == clip.CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                           num_attention_heads=16, image_size=224, patch_size=14,
                                           hidden_act="quick_gelu", layer_norm_eps=1e-6, projection_dim=1024)
    with pytest.raises(weights.CheckpointError, match="vision_cfg"):
        clip.CLIPVisionConfig.from_openclip({"model_cfg": {"embed_dim": 8}})


def test_vit_h_14_config_maps_every_key():
    """open_clip's own ViT-H-14 config (the E4T paper's encoder), on meta tensors: no weights."""
    open_clip_model = _open_clip_model()
    config = json.loads((Path(open_clip_model.__file__).parent / "model_configs" / "ViT-H-14.json").read_text())
    with torch.device("meta"):
        model = open_clip_model.CLIP(**config)
    # One-byte stubs of the real shapes keep this test's memory small (the tower has 632M parameters).
    stubs = {key: np.broadcast_to(np.zeros((), np.bool_), tuple(value.shape)) for key, value in model.state_dict().items()}
    module = clip.CLIPVisionTransformer(clip.CLIPVisionConfig.from_openclip(config), with_projection=True)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    params = weights.state_dict_to_params(clip.openclip_vision_state(stubs), abstract, dtype=np.bool_)
    ours = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    theirs = sum(value.numel() for key, value in model.state_dict().items() if key.startswith("visual."))
    assert ours == theirs == sum(p.numel() for p in model.visual.parameters()) > 630_000_000


# Root files of a repository with both formats (as laion's CLIP repositories), and of an OpenCLIP-only one.
BOTH_FORMATS = ["config.json", "model.safetensors", "pytorch_model.bin", "open_clip_config.json",
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "preprocessor_config.json",
                "tokenizer.json", "vocab.json", "merges.txt", "README.md"]
OPENCLIP_ONLY = ["open_clip_config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors", "README.md"]


def test_hub_download_picks_one_format_and_no_pickles():
    from huggingface_hub.utils import filter_repo_objects

    def fetched(files):
        return set(filter_repo_objects(files, allow_patterns=weights.single_model_patterns(files)))

    assert {f for f in fetched(BOTH_FORMATS) if "model" in f} == {"model.safetensors"}
    assert fetched(OPENCLIP_ONLY) == {"open_clip_config.json", "open_clip_model.safetensors"}
    renamed = [f.replace("open_clip_model", "open_clip_pytorch_model") for f in OPENCLIP_ONLY]
    assert fetched(renamed) == {"open_clip_config.json", "open_clip_pytorch_model.safetensors"}
    with pytest.raises(weights.CheckpointError, match=r"pickles \(open_clip_pytorch_model.bin\) are never loaded"):
        weights.single_model_patterns(["open_clip_config.json", "open_clip_pytorch_model.bin"])
    assert set(weights.single_model_patterns(None)) >= {"open_clip_model.safetensors", "model.safetensors"}


@pytest.mark.parametrize("listing, expected", [(OPENCLIP_ONLY, ["open_clip_config.json", "open_clip_model.safetensors"]),
                                               (None, weights.single_model_patterns(None))])
def test_resolve_fetches_what_the_listing_allows(monkeypatch, tmp_path, listing, expected):
    import huggingface_hub

    def list_repo_files(self, repo_id):
        if listing is None:
            raise ConnectionError("offline")
        return listing

    asked = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: asked.update(patterns=allow_patterns) or str(tmp_path))
    assert weights.resolve_model("laion/some-open-clip-model", parts=None) == tmp_path
    assert asked["patterns"] == expected
