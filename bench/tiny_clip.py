"""A tiny random transformers ``CLIPModel`` folder, for running the CLIP metrics without a download.

Its scores carry no meaning (random weights): it exercises CLIP-I / CLIP-T end to end
(``bench/compare_methods.py --clip``) and is the PyTorch reference of their parity test.

    python bench/tiny_clip.py OUT_FOLDER
"""
from __future__ import annotations

import argparse
from pathlib import Path


def write(folder: str | Path, seed: int = 0) -> Path:
    """Saves a CLIPModel (2-layer towers of width 32, 32 px images, projection 24, weights
    perturbed away from their init so that a swapped or missing weight shows) with the tiny
    tokenizer (:func:`e4t_jax.tokenizer.make_tiny_tokenizer_files`) beside it."""
    import torch
    import transformers

    from e4t_jax import tokenizer as tok

    folder = Path(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok.make_tiny_tokenizer_files(folder)))
    text = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                           projection_dim=24)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.out, args.seed))
