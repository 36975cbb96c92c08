"""The torch-free CLIP tokenizer gives exactly OpenCLIP's ids."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from cliptuner.model.tokenizer import VOCAB_FILENAME, ClipTokenizer, clean_text

TEXTS = [
    "a photo of a cat",
    "",
    "   \t\n  ",
    "Hello, World!!! ¿Qué tal? naïve café — “quotes” ‘single’ …",
    "😀👍🏽 👨‍👩‍👧 family emoji 🇫🇷 flags",
    "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;x&quot; &#39;y&#39; &copy;",
    "schÃ¶n mojibake Ã©tÃ©",  # ftfy repairs this
    "don't I'LL we've they're I'm he'd 12345 3.14 1,000,000",
    "<start_of_text> <END_OF_TEXT> special tokens typed by a user",
    "日本語のテキスト 中文 한국어 Ελληνικά русский עברית العربية",
    "tab\tnew\nline\r\nmixed   spaces",
    "snake_case_words kebab-case CamelCase x_y",
    "e\u0301 combining accent, zero\u200bwidth, nbsp\u00a0here",
    "punctuation!!!???...;;;:::((([[[{{{",
    "word " * 100,  # truncated at both context lengths
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.fixture(scope="module")
def vocab() -> str:
    return default_bpe()


def test_vocab_file_name_matches_open_clip(vocab):
    assert vocab.endswith(VOCAB_FILENAME)


@pytest.mark.parametrize("context_length", [32, 77])
def test_ids_equal_open_clip(vocab, context_length):
    ours = ClipTokenizer(vocab, context_length)(TEXTS)
    theirs = SimpleTokenizer(context_length=context_length)(TEXTS).numpy()
    assert ours.dtype == np.int64
    assert ours.shape == (len(TEXTS), context_length)
    for row, text in enumerate(TEXTS):
        np.testing.assert_array_equal(ours[row], theirs[row], err_msg=f"text #{row}: {text[:40]!r}")


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_clean_modes_equal_open_clip(vocab, clean):
    ours = ClipTokenizer(vocab, 77, clean=clean)(TEXTS)
    theirs = SimpleTokenizer(context_length=77, clean=clean)(TEXTS).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_truncation_ends_with_end_of_text(vocab):
    tok = ClipTokenizer(vocab, 32)
    ids = tok(["word " * 100])[0]
    assert ids[0] == tok.sot_token_id == 49406
    assert ids[-1] == tok.eot_token_id == 49407
    assert (ids != 0).all()  # cut, not padded
    assert len(tok.encode("word " * 100)) == 100


def test_empty_string_is_start_end_and_padding(vocab):
    ids = ClipTokenizer(vocab, 77)([""])[0]
    assert ids[:2].tolist() == [49406, 49407]
    assert not ids[2:].any()


def test_single_string_is_a_batch_of_one(vocab):
    tok = ClipTokenizer(vocab, 32)
    np.testing.assert_array_equal(tok("a dog"), tok(["a dog"]))
    assert tok([]).shape == (0, 32)


def test_clean_text_lowercases_unescapes_and_fixes(vocab):
    assert clean_text("  Caf&amp;eacute;  SchÃ¶n\n\tOK ") == "café schön ok"


def test_concurrent_calls_agree(vocab):
    tok = ClipTokenizer(vocab, 77, cache_size=8)  # tiny cache: evictions happen while threads race
    expected = tok(TEXTS)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: tok(TEXTS), range(16)))
    for result in results:
        np.testing.assert_array_equal(result, expected)


def test_bad_arguments_raise(vocab, tmp_path):
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(vocab, 1)
    with pytest.raises(ValueError, match="clean must be one of"):
        ClipTokenizer(vocab, 77, clean="upper")
    with pytest.raises(ValueError, match="does not exist"):
        ClipTokenizer(tmp_path / "missing.txt.gz", 77)
    with pytest.raises(TypeError, match="text #1"):
        ClipTokenizer(vocab, 77)(["ok", None])


def test_a_file_that_is_not_a_clip_vocab_is_refused(tmp_path):
    import gzip

    path = tmp_path / "vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("#version: 0.2\nh e\nt h\n")
    with pytest.raises(ValueError, match="not a CLIP BPE vocab"):
        ClipTokenizer(path, 77)
