"""The tiny CLIP tokenizer and the placeholder-token wrapper, against transformers."""
import warnings

import numpy as np
import pytest
import transformers

from e4t_jax import tokenizer as tok

PROMPTS = [
    "a photo of a cat",
    "A watercolor   Painting of a Woman in the style of van gogh",
    "portrait of an old man wearing a red hat, oil painting, xyzzy",
    "",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A diffusers-style model folder whose ``tokenizer/`` is the tiny tokenizer."""
    root = tmp_path_factory.mktemp("model")
    tok.make_tiny_tokenizer_files(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def reference(model_dir):
    return transformers.CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))


@pytest.fixture
def tokenizer(model_dir):
    return tok.Tokenizer.from_folder(model_dir)


def test_bytes_to_unicode_is_the_clip_table():
    table = tok.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert not any(char.isspace() for char in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120" and table[0] == "\u0100"


def test_tiny_tokenizer_loads_and_keeps_words_whole(reference):
    assert len(reference) == tok.TINY_VOCAB_SIZE
    assert reference.model_max_length == 77
    assert reference.convert_ids_to_tokens([reference.bos_token_id, reference.eos_token_id]) == [
        "<|startoftext|>", "<|endoftext|>"]
    assert reference.pad_token_id == reference.eos_token_id
    pieces = reference(list(tok.TINY_WORDS), add_special_tokens=False).input_ids
    assert [word for word, ids in zip(tok.TINY_WORDS, pieces) if len(ids) != 1] == []


def test_tiny_tokenizer_round_trips_text(reference):
    for prompt in PROMPTS[:2] + ["portrait of an old man wearing a red hat xyzzy café"]:
        ids = reference(prompt).input_ids
        assert reference.decode(ids, skip_special_tokens=True) == " ".join(prompt.lower().split())


def test_encode_matches_transformers_padding(tokenizer, reference):
    ids = tokenizer.encode(PROMPTS)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, np.array(expected))
    assert ids[3, 0] == reference.bos_token_id and (ids[3, 1:] == reference.pad_token_id).all()


def test_placeholders_found_in_the_middle_and_next_to_punctuation(tokenizer, reference):
    vocab_size = tokenizer.vocab_size
    s_id, face_id = tokenizer.add_placeholder("S*", "face")
    s1_id, cat_id = tokenizer.add_placeholder("S1*", "cat")
    assert (s_id, s1_id) == (vocab_size, vocab_size + 1) and tokenizer.vocab_size == vocab_size + 2
    assert reference(["face", "cat"], add_special_tokens=False).input_ids == [[face_id], [cat_id]]
    assert tokenizer.placeholders == {"S*": s_id, "S1*": s1_id}

    ids = tokenizer.encode(["a photo of S*, smiling", "(S*) in the style of S1*", "a s* cat"])
    assert [list(np.flatnonzero(row == s_id)) for row in ids] == [[4], [2], []]
    assert list(np.flatnonzero(ids[1] == s1_id)) == [8]
    assert tokenizer.decode(ids[0]) == "a photo of S*, smiling"
    # The words around the placeholder tokenize as without it.
    assert tokenizer.token_ids("a photo of S*, smiling") == (
        tokenizer.token_ids("a photo of") + [s_id] + tokenizer.token_ids(", smiling"))


def test_truncation_warns_with_the_prompt(tokenizer):
    long_prompt = "a photo of " + "cat " * 80
    with pytest.warns(UserWarning, match="a photo of cat cat.*truncated"):
        ids = tokenizer.encode([long_prompt, "a cat"])
    assert ids.shape == (2, 77) and ids[0, -1] == tokenizer.clip_tokenizer.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer.encode(["a cat"] * 2)


def test_missing_placeholder_raises_a_clear_error():
    tok.Tokenizer.require_placeholder(["a photo of S*", "S*, smiling"], "S*")
    with pytest.raises(ValueError, match=r"prompt 'a photo of s\*' does not contain the placeholder "
                                         r"S\*; write it where .* e\.g\. 'a photo of S\*'"):
        tok.Tokenizer.require_placeholder(["S* in the city", "a photo of s*"], "S*")


def test_bad_placeholders_and_initializers_raise(tokenizer):
    tokenizer.add_placeholder("S*", "face")
    for existing in ["S*", "cat", "*"]:
        with pytest.raises(ValueError, match="already a token.*pick another placeholder"):
            tokenizer.add_placeholder(existing, "face")
    with pytest.raises(ValueError, match="'xyzzy' is .* tokens, not one; pick another word"):
        tokenizer.add_placeholder("S2*", "xyzzy")
    with pytest.raises(ValueError, match="without spaces"):
        tokenizer.add_placeholder("my concept", "face")


def test_from_folder_accepts_the_tokenizer_folder_and_rejects_others(model_dir, tmp_path):
    direct = tok.Tokenizer.from_folder(model_dir / "tokenizer")
    assert direct.vocab_size == tok.TINY_VOCAB_SIZE and direct.model_max_length == 77
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        tok.Tokenizer.from_folder(tmp_path)
