"""Hugging Face tokenizers at serving time, torch-free: ``tokenizer.json`` read by the Rust ``tokenizers`` package.

OpenCLIP models whose text tower was trained with a Hugging Face tokenizer (SigLIP and SigLIP2's SentencePiece
vocabularies, XLM-RoBERTa and NLLB for multilingual CLIP, …) tokenize through ``transformers``' fast tokenizer,
which is itself a ``tokenizers.Tokenizer`` built from ``tokenizer.json``. OpenCLIP's ``HFTokenizer`` cleans each
text (``whitespace`` by default, ``canonicalize`` for SigLIP), then asks for ``max_length=context_length``,
``padding="max_length"``, ``truncation=True``, optionally replacing the separator token by 0
(``strip_sep_token``). :class:`HfTokenizer` does the same with the ``tokenizers`` package alone, from what
``model.json`` records (:class:`cliptuner.model.manifest.TokenizerSpec`): the file, the context length, the
cleaning, the pad id and sides of padding and truncation, and the separator id to strip. The exporter checks
that it gives open_clip's ids on sample texts before a model directory is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cliptuner.model.tokenizer import CLEAN_MODES, ClipTokenizer, clean_text

SIDES = ("right", "left")


class HfTokenizer:
    """``list[str]`` → int64 ids ``[batch, context_length]`` with a ``tokenizer.json``.

    Thread-safe: its settings are fixed in ``__init__`` and encoding does not change them.

    Args:
        path: the ``tokenizer.json`` file.
        context_length: tokens per row, special tokens included.
        clean: OpenCLIP's text cleaning applied first (``whitespace`` is ``HFTokenizer``'s default).
        pad_id: the id that fills a row up to ``context_length``.
        padding_side: where padding goes (``right`` or ``left``).
        truncation_side: which end of an over-long text is cut (``right`` keeps its start).
        strip_sep_id: an id replaced by 0 after encoding (OpenCLIP's ``strip_sep_token``), or None.

    Raises:
        ValueError: a missing or unreadable file, a bad context length, cleaning mode, side or pad id.
    """

    def __init__(
        self,
        path: str | Path,
        context_length: int,
        clean: str = "whitespace",
        pad_id: int = 0,
        padding_side: str = "right",
        truncation_side: str = "right",
        strip_sep_id: Optional[int] = None,
    ) -> None:
        from tokenizers import Tokenizer

        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
        if clean not in CLEAN_MODES:
            raise ValueError(f"clean must be one of {list(CLEAN_MODES)}, got {clean!r}")
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in SIDES:
                raise ValueError(f"{name} must be one of {list(SIDES)}, got {side!r}")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own exception type for a malformed file
            raise ValueError(f"{str(path)!r} is not a tokenizers tokenizer.json: {exc}") from exc
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if not isinstance(pad_id, int) or isinstance(pad_id, bool) or not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be an id of the vocab (0..{vocab_size - 1}), got {pad_id!r}")
        tokenizer.enable_truncation(max_length=context_length, direction=truncation_side)
        tokenizer.enable_padding(
            direction=padding_side,
            pad_id=pad_id,
            pad_token=tokenizer.id_to_token(pad_id) or "",
            length=context_length,
        )
        self.path = path
        self.context_length = context_length
        self.clean = clean
        self.pad_id = pad_id
        self.strip_sep_id = strip_sep_id
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._untruncated = Tokenizer.from_file(str(path))  # the same vocab, neither cut nor padded
        self._untruncated.no_truncation()
        self._untruncated.no_padding()

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize a batch of texts (a single ``str`` counts as a batch of one).

        Returns:
            ``np.ndarray`` int64 ``[batch, context_length]``.

        Raises:
            TypeError: an item is not a string (names its index).
        """
        if isinstance(texts, str):
            texts = [texts]
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text #{row} must be a str, got {type(text).__name__}")
        if not texts:
            return np.zeros((0, self.context_length), dtype=np.int64)
        encodings = self._tokenizer.encode_batch([clean_text(text, self.clean) for text in texts])
        out = np.asarray([encoding.ids for encoding in encodings], dtype=np.int64)  # [batch, context_length]
        if self.strip_sep_id is not None:
            out[out == self.strip_sep_id] = 0
        return out

    def token_count(self, text: str) -> int:
        """How many tokens ``text`` takes before truncation and padding, special tokens included."""
        return len(self._untruncated.encode(clean_text(text, self.clean)).ids)


def load_tokenizer(spec: Any, model_dir: str | Path) -> ClipTokenizer | HfTokenizer:
    """The serving tokenizer a ``model.json`` ``tokenizer`` section describes, read from ``model_dir``.

    Args:
        spec: a :class:`cliptuner.model.manifest.TokenizerSpec`.
        model_dir: the model directory holding ``spec.vocab``.

    Raises:
        ValueError: an unknown kind, or a file the tokenizer cannot read.
    """
    path = Path(model_dir) / spec.vocab
    if spec.kind == "clip_bpe":
        return ClipTokenizer(path, spec.context_length, spec.clean)
    if spec.kind == "hf":
        return HfTokenizer(
            path,
            spec.context_length,
            spec.clean,
            pad_id=spec.pad_id if spec.pad_id is not None else 0,
            padding_side=spec.padding_side or "right",
            truncation_side=spec.truncation_side or "right",
            strip_sep_id=spec.strip_sep_id,
        )
    raise ValueError(f"tokenizer kind {spec.kind!r} is not supported; known: ['clip_bpe', 'hf']")
