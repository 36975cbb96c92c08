"""The model-directory format: what ``model.json`` holds and which files make a directory servable.

A model directory (written by :func:`cliptuner.train.export.export_model_dir`, published by
:class:`cliptuner.model.registry.Registry`, served by :class:`cliptuner.model.runtime.OnnxClip`)::

    model.json                      this module's ModelManifest
    visual.onnx                     pixel_values float32 [batch, 3, H, W] -> embeddings float32 [batch, D]
    textual.onnx                    input_ids    int64   [batch, context] -> embeddings float32 [batch, D]
    bpe_simple_vocab_16e6.txt.gz    the CLIP BPE vocab (tokenizer kind clip_bpe), or
    tokenizer.json                  a Hugging Face tokenizer (kind hf: SigLIP, XLM-RoBERTa, NLLB…)
    checkpoint.pt                   optional: the torch weights, to fine-tune or re-export

This module is the one place that knows the file names, the format tag, the ONNX input/output names and the
keys of ``model.json``; everyone else reads and writes the directory through :class:`ModelManifest`.
Torch-free: serving imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from cliptuner.model.atomic import write_atomic
from cliptuner.model.images import RESIZE_MODES  # shortest, squash, longest: cliptuner.model.images.fit_image
from cliptuner.model.tokenizer import CLEAN_MODES, VOCAB_FILENAME

MANIFEST_FILE = "model.json"
FORMAT = "cliptuner-model-v1"
VISUAL_FILE = "visual.onnx"
TEXTUAL_FILE = "textual.onnx"
CHECKPOINT_FILE = "checkpoint.pt"
VOCAB_FILE = VOCAB_FILENAME  # the vocab is stored under the name OpenCLIP ships it with
IMAGE_INPUT = "pixel_values"
TEXT_INPUT = "input_ids"
OUTPUT = "embeddings"
REQUIRED_FILES = (MANIFEST_FILE, VISUAL_FILE, TEXTUAL_FILE, VOCAB_FILE)  # a CLIP BPE directory; files() names any
HF_TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face tokenizer, read by the tokenizers package
# clip_bpe: cliptuner.model.tokenizer.ClipTokenizer; hf: cliptuner.model.hf_tokenizer.HfTokenizer
TOKENIZER_KINDS = ("clip_bpe", "hf")
SIDES = ("right", "left")
PRECISIONS = ("fp32", "fp16", "int8")  # of the ONNX graphs: as exported, float16 (CUDA), int8 dynamic (CPU)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # what cliptuner.model.images.preprocess implements
LINEAGE_KEYS = ("version", "parent_version", "report")  # set by whoever exports / publishes; in model.json once set


class _Section:
    """A JSON object with known keys (the dataclass fields) and unknown ones kept verbatim in ``extra``."""

    extra: dict[str, Any]
    _omit_none: ClassVar[tuple[str, ...]] = ()  # fields left out of the JSON while None

    def __post_init__(self) -> None:
        clashes = sorted(set(self.extra) & _field_names(type(self)))
        if clashes:
            raise ValueError(f"{type(self).__name__}.extra keys {clashes} shadow fields of the same name")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: known keys in field order, then the unknown keys read with it (deep copies)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name in self._omit_none):
                continue
            out[f.name] = value.to_dict() if isinstance(value, _Section) else copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def _parse(cls, data: Any, source: str, prefix: str = "") -> Any:
        """Build from a JSON object; missing required keys are named with their dotted path."""
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{source}: {prefix.rstrip('.') or 'the manifest'} must be a JSON object, got {type(data).__name__}"
            )
        hints = typing.get_type_hints(cls)
        known = [f for f in dataclasses.fields(cls) if f.name != "extra"]
        missing = [
            prefix + f.name
            for f in known
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{source} lacks {missing}")
        kwargs: dict[str, Any] = {}
        for f in known:
            if f.name in data:
                value = data[f.name]
                section = hints[f.name]
                if isinstance(section, type) and issubclass(section, _Section):
                    value = section._parse(value, source, f"{prefix}{f.name}.")
                kwargs[f.name] = copy.deepcopy(value)
        names = _field_names(cls)
        return cls(**kwargs, extra={k: copy.deepcopy(v) for k, v in data.items() if k not in names})


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"extra"}


@dataclass(kw_only=True)
class TokenizerSpec(_Section):
    """``model.json`` ``tokenizer``: which tokenizer serves the text tower and how it is set up.

    ``clip_bpe`` (:class:`cliptuner.model.tokenizer.ClipTokenizer`) needs only ``vocab``, ``context_length`` and
    ``clean``; ``hf`` (:class:`cliptuner.model.hf_tokenizer.HfTokenizer`) also says how rows are padded and cut —
    the text tower's pooling depends on it (SigLIP pools the last position, so rows are padded to the context
    length; an HF text tower masks ``pad_id``) — and which separator id OpenCLIP replaces by 0, if any.
    """

    kind: str = TOKENIZER_KINDS[0]
    vocab: str = VOCAB_FILE
    context_length: int
    clean: str = "lower"
    pad_id: Optional[int] = None  # hf: the id that fills each row to context_length
    padding_side: Optional[str] = None  # hf: right (default) or left
    truncation_side: Optional[str] = None  # hf: right (keeps a long text's start, the default) or left
    strip_sep_id: Optional[int] = None  # hf: an id replaced by 0 (OpenCLIP's strip_sep_token)
    extra: dict[str, Any] = field(default_factory=dict)
    _omit_none: ClassVar[tuple[str, ...]] = ("pad_id", "padding_side", "truncation_side", "strip_sep_id")


@dataclass(kw_only=True)
class OnnxGraph(_Section):
    """One tower's graph: its file in the directory and its input / output names."""

    file: str
    input: str
    output: str = OUTPUT
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class OnnxSpec(_Section):
    """``model.json`` ``onnx``: the two towers."""

    visual: OnnxGraph
    textual: OnnxGraph
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def standard(cls) -> OnnxSpec:
        """The layout the exporter writes: ``visual.onnx`` (``pixel_values``), ``textual.onnx`` (``input_ids``)."""
        return cls(
            visual=OnnxGraph(file=VISUAL_FILE, input=IMAGE_INPUT, output=OUTPUT),
            textual=OnnxGraph(file=TEXTUAL_FILE, input=TEXT_INPUT, output=OUTPUT),
        )


@dataclass(kw_only=True)
class ModelManifest(_Section):
    """Everything ``model.json`` holds: the arch, the preprocessing, the tokenizer, the graphs and the lineage.

    ``to_dict()`` is the ``model.json`` object; keys this version does not know (written by an older or newer
    cliptuner, or passed as ``metadata_extra`` to the exporter) are kept in ``extra`` and written back as they
    were. ``version``, ``parent_version`` and ``report`` are omitted from the JSON while None.
    """

    format: str = FORMAT
    arch: str
    pretrained: Optional[str] = None  # the OpenCLIP pretrained tag or checkpoint the weights started from
    force_quick_gelu: bool = False
    embed_dim: int
    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str
    resize_mode: str = RESIZE_MODES[0]
    fill_color: Optional[int] = None  # resize_mode longest: the grey level it pads with (None: 0, black)
    tokenizer: TokenizerSpec
    onnx: OnnxSpec
    created_at: Optional[str] = None  # ISO 8601, UTC
    opset: Optional[int] = None
    exporter: Optional[str] = None
    precision: str = PRECISIONS[0]  # of the graphs' weights (a model.json without it: fp32)
    parity: Optional[dict[str, Any]] = None  # cliptuner.train.export.export_onnx's parity result
    checkpoint: Optional[str] = None  # CHECKPOINT_FILE when the directory carries the torch weights
    version: Optional[str] = None  # set by Registry.publish
    parent_version: Optional[str] = None
    report: Optional[dict[str, Any]] = None  # the training run's report
    # exp(logit_scale) and the SigLIP family's logit bias of the tuned weights: a client turns the cosine s of
    # two embeddings into the model's probability with sigmoid(logit_scale * s + logit_bias) (SigLIP) or a
    # softmax over logit_scale * s (CLIP); search ranks by s alone
    logit_scale: Optional[float] = None
    logit_bias: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)
    _omit_none: ClassVar[tuple[str, ...]] = LINEAGE_KEYS + ("fill_color", "logit_scale", "logit_bias")

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = MANIFEST_FILE) -> ModelManifest:
        """Parse and check a ``model.json`` object.

        Args:
            data: the parsed JSON.
            source: how to name it in errors (the file's path).

        Raises:
            ValueError: an unknown format, a missing key, an unsupported tokenizer / preprocessing, or a malformed
                value (names ``source`` and the key).
        """
        if isinstance(data, Mapping) and data.get("format") != FORMAT:
            raise ValueError(f"{source} has format {data.get('format')!r}; expected {FORMAT!r}")
        manifest = cls._parse(data, source)
        manifest.check(source)
        return manifest

    # -- the directory -----------------------------------------------------------------------------------------
    @classmethod
    def read(cls, model_dir: Union[str, Path]) -> ModelManifest:
        """Read and check ``model.json`` of a model directory, and that the files it names are there.

        Raises:
            ValueError: no ``model.json``, unreadable JSON, a bad manifest (see :meth:`from_dict`) or a missing
                ONNX / vocab file — every message names the directory or the file.
        """
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST_FILE
        if not path.is_file():
            raise ValueError(f"{str(model_dir)!r} is not a model directory: no {MANIFEST_FILE}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {str(path)!r}: {exc}") from exc
        manifest = cls.from_dict(data, source=repr(str(path)))
        missing = [name for name in manifest.files() if not (model_dir / name).is_file()]
        if missing:
            raise ValueError(f"{str(model_dir)!r} is not a model directory: missing {missing}")
        return manifest

    def write(self, model_dir: Union[str, Path]) -> Path:
        """Replace ``model_dir/model.json`` atomically (fsynced temp file + rename). Returns its path."""
        path = Path(model_dir) / MANIFEST_FILE
        write_atomic(path, self.to_json())
        return path

    def files(self) -> tuple[str, ...]:
        """The files serving needs besides ``model.json``: the two graphs and the vocab."""
        return (self.onnx.visual.file, self.onnx.textual.file, self.tokenizer.vocab)

    def checkpoint_path(self, model_dir: Union[str, Path]) -> Optional[Path]:
        """``model_dir``'s torch checkpoint, or None when the manifest names none or the file is not there."""
        if not self.checkpoint:
            return None
        path = Path(model_dir) / self.checkpoint
        return path if path.is_file() else None

    # -- checks ------------------------------------------------------------------------------------------------
    def check(self, source: str = MANIFEST_FILE) -> None:
        """Raise ValueError (naming ``source``) when the runtime could not serve what this manifest describes."""
        if self.format != FORMAT:
            raise ValueError(f"{source} has format {self.format!r}; expected {FORMAT!r}")
        if self.tokenizer.kind not in TOKENIZER_KINDS:
            raise ValueError(
                f"{source}: tokenizer kind {self.tokenizer.kind!r} is not supported; known: {list(TOKENIZER_KINDS)}"
            )
        _check_choice(source, "tokenizer.clean", self.tokenizer.clean, CLEAN_MODES)
        if self.tokenizer.kind == "hf":
            pad_id = self.tokenizer.pad_id
            if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
                raise ValueError(
                    f"{source}: tokenizer.pad_id must be an integer >= 0 for an hf tokenizer, got {pad_id!r}"
                )
            for key in ("padding_side", "truncation_side"):
                value = getattr(self.tokenizer, key)
                if value is not None:
                    _check_choice(source, f"tokenizer.{key}", value, SIDES)
        fill = self.fill_color
        if fill is not None and (not isinstance(fill, int) or isinstance(fill, bool) or not 0 <= fill <= 255):
            raise ValueError(f"{source}: fill_color must be an integer in [0, 255], got {self.fill_color!r}")
        _check_choice(source, "resize_mode", self.resize_mode, RESIZE_MODES)
        _check_choice(source, "precision", self.precision, PRECISIONS)
        _check_choice(source, "interpolation", self.interpolation, INTERPOLATIONS)
        for key, value in (
            ("embed_dim", self.embed_dim),
            ("image_size", self.image_size),
            ("tokenizer.context_length", self.tokenizer.context_length),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
        for key, value in (("mean", self.mean), ("std", self.std)):
            if (
                not isinstance(value, list)
                or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise ValueError(f"{source}: {key} must be a list of 3 numbers, got {value!r}")
        named = [
            ("onnx.visual.file", self.onnx.visual.file),
            ("onnx.textual.file", self.onnx.textual.file),
            ("tokenizer.vocab", self.tokenizer.vocab),
        ]
        if self.checkpoint is not None:
            named.append(("checkpoint", self.checkpoint))
        for key, name in named:  # a bare name: a manifest must not point outside its directory
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise ValueError(f"{source}: {key} must be a file name inside the model directory, got {name!r}")


def _check_choice(source: str, key: str, value: Any, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"{source}: {key} {value!r} is not supported; known: {list(known)}")
