"""CLIP tokenizer with placeholder tokens (``S*``), and a tiny tokenizer built offline.

:class:`Tokenizer` wraps ``transformers.CLIPTokenizer`` (in transformers 5 the one CLIP
tokenizer class, backed by the Rust ``tokenizers`` library) and adds what E4T needs:
placeholder tokens whose embedding the encoder predicts, their positions in a batch of
token ids, and the padding that diffusers' ``StableDiffusionPipeline`` uses
(``padding="max_length"``, ``truncation=True``, 77 tokens).

:func:`make_tiny_tokenizer_files` writes a small but real CLIP byte-level BPE tokenizer
for tests and demos with no download: the 256 byte symbols, their ``</w>`` end-of-word
forms, one merge chain per word of :data:`TINY_WORDS` (so each becomes a single token),
and ``<|startoftext|>`` / ``<|endoftext|>``. Its vocabulary size is
:data:`TINY_VOCAB_SIZE` (1,142 with the current word list: 512 byte symbols,
628 merged tokens, 2 special tokens). Any text tokenizes; words
outside the list split into smaller pieces, down to single bytes.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from e4t_jax import files


def _not_the_torch_notice(record: logging.LogRecord) -> bool:
    """transformers says "PyTorch was not found" on import; e4t-jax needs only its tokenizer."""
    return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(_not_the_torch_notice)  # before the import that logs it
import transformers  # noqa: E402

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
END_OF_WORD = "</w>"

# Words of typical personalization prompts; each is one token in the tiny tokenizer.
TINY_WORDS = (
    "a an the of in on at with and by as to from for is it its this that my his her "
    "photo photograph picture image painting drawing sketch portrait selfie render "
    "face cat dog man woman person people child boy girl baby old young smiling "
    "watercolor oil pencil charcoal ink pastel acrylic digital art artwork illustration "
    "style styled cartoon anime comic pixar disney realistic photorealistic detailed "
    "beach city street forest mountain mountains snow desert garden park river lake "
    "sea ocean sky night day sunset sunrise rain space moon mars castle room studio "
    "background wearing hat glasses suit dress shirt jacket crown armor helmet "
    "red blue green yellow black white golden purple pink orange "
    "close up closeup shot wide angle lighting light dark bright soft high quality "
    "best masterpiece hd sharp focus cinematic dramatic epic beautiful cute "
    "van gogh monet picasso rembrandt vermeer klimt starry famous "
    "statue sculpture marble bronze stone wood paper mosaic stained glass "
    "astronaut knight king queen wizard robot superhero chef doctor pirate "
    "sitting standing running holding riding reading playing looking sleeping "
    "side front view profile head body full half color colorful vintage retro "
    "renaissance baroque impressionist cubist pop surreal abstract minimalist"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP byte -> printable unicode character table (256 entries).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space,
    ...) map to the characters U+0100 onward, in byte order, so every byte has a
    visible, non-whitespace symbol.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in table)
    for offset, byte in enumerate(shifted):
        table[byte] = chr(256 + offset)
    return dict(sorted(table.items()))


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _word_symbols(word: str, byte_table: dict[int, str]) -> list[str]:
    symbols = [byte_table[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return symbols


def build_tiny_vocab(words: Sequence[str] = TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and ranked merges that make every word one token.

    Words are added in order; each gets the merges that join its current pieces left to
    right. New merges rank below all earlier ones, so earlier words stay single tokens.
    Ids follow CLIP's layout: bytes, bytes + ``</w>``, merged tokens, BOS, EOS.
    """
    byte_table = bytes_to_unicode()
    tokens = list(byte_table.values()) + [s + END_OF_WORD for s in byte_table.values()]
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        pieces = _apply_merges(_word_symbols(word, byte_table), ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, list(ranks)


TINY_VOCAB_SIZE = len(build_tiny_vocab()[0])


def make_tiny_tokenizer_files(out_dir: str | os.PathLike, words: Sequence[str] = TINY_WORDS) -> Path:
    """Write a tiny CLIP tokenizer that ``CLIPTokenizer.from_pretrained(out_dir)`` loads.

    Files: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``. Pad token is ``<|endoftext|>`` (as in SD 1.x),
    ``model_max_length`` 77; each of ``words`` is one token. With the default words the
    vocabulary size is :data:`TINY_VOCAB_SIZE`. Returns the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_tiny_vocab(words)
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                "pad_token": EOS_TOKEN}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
              "do_lower_case": True, "errors": "replace", **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return out


class Tokenizer:
    """``transformers.CLIPTokenizer`` plus placeholder tokens.

    Token ids are ``np.int32 [B, L]``, L = ``model_max_length`` (77 for Stable
    Diffusion) unless given. After :meth:`add_placeholder`, :attr:`vocab_size` counts
    the new tokens: the text encoder's embedding table must be grown to that size.
    """

    def __init__(self, clip_tokenizer: transformers.CLIPTokenizer):
        self.clip_tokenizer = clip_tokenizer
        self.placeholders: dict[str, int] = {}

    @classmethod
    def from_folder(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        """Load ``model_dir/tokenizer/`` (a diffusers model folder), or ``model_dir``
        itself when it holds ``vocab.json`` or ``tokenizer.json``. Offline.

        Raises:
          FileNotFoundError: no tokenizer files.
          UserError: one of them is over :data:`e4t_jax.files.MAX_JSON_BYTES`.
        """
        folder = Path(model_dir)
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        if not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            raise FileNotFoundError(
                f"no CLIP tokenizer in {model_dir}: expected tokenizer/vocab.json (a diffusers "
                "model folder) or vocab.json + merges.txt in the folder itself")
        for file in folder.iterdir():  # what from_pretrained reads: its JSON files and merges.txt
            if file.suffix in (".json", ".txt") and file.is_file():
                files.check_size(file)
        return cls(transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, placeholders included (``len`` of the HF tokenizer)."""
        return len(self.clip_tokenizer)

    @property
    def model_max_length(self) -> int:
        return self.clip_tokenizer.model_max_length

    @property
    def pad_token_id(self) -> int:
        return self.clip_tokenizer.pad_token_id

    def token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS."""
        return self.clip_tokenizer(text, add_special_tokens=False).input_ids

    def add_placeholder(self, token: str = "S*", initializer_word: str = "face") -> tuple[int, int]:
        """Add ``token`` to the vocabulary; return ``(token_id, initializer_id)``.

        ``initializer_id`` is the id of ``initializer_word`` (the coarse domain word,
        whose embedding ``v_class`` the encoder's offset is added to). The placeholder is
        matched case-sensitively anywhere in a prompt, before lower-casing ("S*," and
        "(S*)" both find it; "s*" does not), so choose a string with a symbol in it.
        Raises ``ValueError`` if ``token`` already is one token (a vocabulary entry, a
        word, or a placeholder added before) or ``initializer_word`` is not one token.
        """
        if not token or token != token.strip() or len(token.split()) != 1:
            raise ValueError(f"placeholder {token!r} must be one word without spaces, e.g. 'S*'")
        if token in self.clip_tokenizer.get_vocab() or len(self.token_ids(token)) == 1:
            raise ValueError(
                f"placeholder {token!r} is already a token of the vocabulary; pick another "
                "placeholder that is not a word, e.g. 'S*', 'S1*', '<concept>'")
        initializer_ids = self.token_ids(initializer_word)
        if len(initializer_ids) != 1:
            raise ValueError(
                f"initializer word {initializer_word!r} is {len(initializer_ids)} tokens, not one; "
                "pick another word that is a single token (e.g. 'face', 'cat', 'painting')")
        self.clip_tokenizer.add_tokens([transformers.AddedToken(token, normalized=False)])
        token_id = self.clip_tokenizer.convert_tokens_to_ids(token)
        self.placeholders[token] = token_id
        return token_id, initializer_ids[0]

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Token ids ``np.int32 [B, max_length]``, padded and truncated as diffusers' pipeline.

        Sequences are BOS, tokens, EOS, then pad ids. A prompt over the limit is cut
        (keeping EOS) with a ``UserWarning`` naming it and the dropped text.
        """
        max_length = max_length or self.model_max_length
        prompts = list(prompts)
        full_ids = self.clip_tokenizer(prompts).input_ids
        for prompt, ids in zip(prompts, full_ids):
            if len(ids) > max_length:
                dropped = self.clip_tokenizer.decode(ids[max_length - 1:-1])
                warnings.warn(f"prompt {prompt!r} is {len(ids)} tokens, over the limit of "
                              f"{max_length}; truncated, dropping: {dropped!r}", stacklevel=2)
        batch = self.clip_tokenizer(prompts, padding="max_length", max_length=max_length,
                                    truncation=True, return_tensors="np")
        return batch.input_ids.astype(np.int32)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (BOS/EOS/pad dropped unless asked)."""
        return self.clip_tokenizer.decode(list(np.asarray(ids)), skip_special_tokens=skip_special_tokens)

    @staticmethod
    def require_placeholder(prompts: Sequence[str], token: str = "S*") -> None:
        """Raise ``ValueError`` for the first prompt whose text does not contain ``token``
        (case-sensitive, as the tokenizer matches placeholders)."""
        for prompt in prompts:
            if token not in prompt:
                raise ValueError(
                    f"prompt {prompt!r} does not contain the placeholder {token}; write it where "
                    f"the concept should appear, e.g. 'a photo of {token}'")
