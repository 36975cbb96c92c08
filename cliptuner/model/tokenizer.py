"""CLIP byte-level BPE tokenizer in plain Python/numpy (no torch, no open_clip).

A reimplementation of OpenCLIP's ``SimpleTokenizer`` (itself OpenAI CLIP's tokenizer) that the ONNX runtime
uses, so serving needs neither torch nor open_clip. It produces the same ids as OpenCLIP 3.x:

* clean the text: ``ftfy.fix_text``, ``html.unescape`` twice, strip, then per ``clean`` mode —
  ``lower`` (OpenCLIP's default: collapse whitespace, lowercase), ``whitespace`` (collapse whitespace only)
  or ``canonicalize`` (drop punctuation, ``_`` → space, lowercase, collapse whitespace);
* split with CLIP's regex (the special tokens, English contractions, letter runs, single digits, runs of
  other non-space characters), map UTF-8 bytes to printable characters, merge with the BPE ranks of the
  vocab file (``bpe_simple_vocab_16e6.txt.gz``, shipped with open_clip and copied into each model directory);
* ``<start_of_text>`` + tokens + ``<end_of_text>``; a sequence longer than ``context_length`` is cut to
  ``context_length`` tokens and its last token replaced by ``<end_of_text>``; the rest is zero padding.
"""

from __future__ import annotations

import gzip
import html
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"  # the vocab file OpenCLIP ships and CLIP models use
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
_NUM_MERGES = 49152 - 256 - 2  # merges CLIP uses from the vocab file (its first line is a header)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from UTF-8 bytes to printable unicode characters (no whitespace/control)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


def clean_text(text: str, clean: str = "lower") -> str:
    """Normalise one text as OpenCLIP does before BPE.

    Args:
        text: raw text.
        clean: ``lower`` (OpenCLIP's default), ``whitespace`` or ``canonicalize``.

    Returns:
        The cleaned text.
    """
    text = _basic_clean(text)
    if clean == "lower":
        return _whitespace_clean(text).lower()
    if clean == "whitespace":
        return _whitespace_clean(text)
    if clean == "canonicalize":
        return _canonicalize(text)
    raise ValueError(f"clean must be one of {list(CLEAN_MODES)}, got {clean!r}")


class ClipTokenizer:
    """CLIP BPE tokenizer: ``list[str]`` → int64 ids ``[batch, context_length]``.

    Thread-safe: the only mutable state is a bounded LRU cache of BPE results, which is itself thread-safe.

    Args:
        vocab_path: the gzipped BPE merges file (``bpe_simple_vocab_16e6.txt.gz``).
        context_length: tokens per row, start and end tokens included (77 for OpenAI CLIP).
        clean: text cleaning mode, one of ``CLEAN_MODES`` (OpenCLIP's default is ``lower``).
        cache_size: how many distinct words keep their BPE result (bounded, so a server's memory stays flat).

    Raises:
        ValueError: a missing or malformed vocab file, ``context_length`` < 2, or an unknown ``clean``.
    """

    def __init__(
        self, vocab_path: str | Path, context_length: int = 77, clean: str = "lower", cache_size: int = 65536
    ) -> None:
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
        if clean not in CLEAN_MODES:
            raise ValueError(f"clean must be one of {list(CLEAN_MODES)}, got {clean!r}")
        path = Path(vocab_path)
        if not path.is_file():
            raise ValueError(f"BPE vocab file {str(path)!r} does not exist")
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(
                f"{str(path)!r} is not a CLIP BPE vocab: expected {_NUM_MERGES} merge pairs after "
                f"the header, got {len(merges)}"
            )
        self.vocab_path = path
        self.context_length = context_length
        self.clean = clean
        self.byte_encoder = bytes_to_unicode()
        base = list(self.byte_encoder.values())
        vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[SPECIAL_TOKENS[0]]
        self.eot_token_id = self.encoder[SPECIAL_TOKENS[1]]
        self._pattern = regex.compile(
            "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._bpe_ids = lru_cache(maxsize=cache_size)(self._bpe_ids_uncached)

    def _bpe(self, token: str) -> list[str]:
        """Merge the characters of one byte-mapped word by BPE rank (CLIP's algorithm)."""
        if token in SPECIAL_TOKENS:
            return [token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return list(word)

    def _bpe_ids_uncached(self, token: str) -> tuple[int, ...]:
        return tuple(self.encoder[piece] for piece in self._bpe(token))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        ids: list[int] = []
        for word in self._pattern.findall(clean_text(text, self.clean)):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self._bpe_ids(mapped))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize a batch of texts.

        Args:
            texts: the texts (a single ``str`` counts as a batch of one, as in OpenCLIP).

        Returns:
            ``np.ndarray`` int64 ``[batch, context_length]``: ``<start_of_text>``, tokens, ``<end_of_text>``,
            zeros; over-long rows are cut and end with ``<end_of_text>``.

        Raises:
            TypeError: an item is not a string (names its index).
        """
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)  # [batch, context_length]
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text #{row} must be a str, got {type(text).__name__}")
            tokens = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot_token_id
            out[row, : len(tokens)] = tokens
        return out
