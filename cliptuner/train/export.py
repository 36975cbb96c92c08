"""Export an OpenCLIP model to two ONNX graphs and a model directory that serves without torch.

``visual.onnx``  ``pixel_values`` float32 ``[batch, 3, H, W]``  → ``embeddings`` float32 ``[batch, D]``
``textual.onnx`` ``input_ids``    int64   ``[batch, context]``  → ``embeddings`` float32 ``[batch, D]``

Both outputs are L2-normalised inside the graph and the batch axis is dynamic. After export the graphs are
checked with ``onnx.checker`` and, by default, compared with torch end to end at batch sizes other than the one
traced: the graphs get what :class:`cliptuner.model.runtime.OnnxClip` will feed them (images decoded and
preprocessed by :mod:`cliptuner.model.images`, texts tokenized by the serving tokenizer of
:mod:`cliptuner.model.hf_tokenizer`), torch gets open_clip's own tokenization of the same texts, and the two
tokenizations must agree id for id.

Tokenizers: the CLIP BPE (``clip_bpe``: open_clip's ``SimpleTokenizer``, served by the project's port) and Hugging
Face tokenizers (``hf``: open_clip's ``HFTokenizer`` — SigLIP, SigLIP2, XLM-RoBERTa, NLLB…; the directory carries
the ``tokenizer.json`` that the ``tokenizers`` package serves). The SigLIP text tower's last-token pooling and an
HF text tower's attention mask over ``pad_id`` are traced into the graph; the logit scale and bias are recorded
in ``model.json``.

The exporter is torch's TorchScript-based one (``dynamo=False``): it handles OpenCLIP's ViT and text
transformer in seconds and needs no extra package. The ``torch.export``-based exporter is available with
``exporter="dynamo"`` (it needs ``onnxscript``). Either way PyTorch's fused multi-head-attention fast path is
switched off while tracing, since ``aten::_native_multi_head_attention`` has no ONNX form.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cliptuner.model.hf_tokenizer import HfTokenizer, load_tokenizer
from cliptuner.model.images import DEFAULT_LIMITS, ImageSource, decode_image, preprocess
from cliptuner.model.manifest import (
    CHECKPOINT_FILE,
    HF_TOKENIZER_FILE,
    IMAGE_INPUT,
    INTERPOLATIONS,
    LINEAGE_KEYS,
    OUTPUT,
    PRECISIONS,
    RESIZE_MODES,
    TEXT_INPUT,
    TEXTUAL_FILE,
    VISUAL_FILE,
    VOCAB_FILE,
    ModelManifest,
    OnnxSpec,
    TokenizerSpec,
)
from cliptuner.model.tokenizer import ClipTokenizer
from cliptuner.train.models import ClipBundle, save_checkpoint

logger = logging.getLogger(__name__)

try:
    import onnx
    import onnxruntime as ort
    from open_clip import tokenizer as _oc_tokenizer
except ImportError as exc:  # pragma: no cover - dependency missing
    raise ImportError(
        "ONNX export needs onnx, onnxruntime and open_clip: pip install onnx onnxruntime open_clip_torch"
    ) from exc

EXPORTERS = ("torchscript", "dynamo")
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter writes opset 18+ (down-conversion fails on CLIP)
TRACE_BATCH = 2  # batch size of the example inputs traced; parity runs at other sizes
# the least per-row cosine with torch's fp32 embeddings that each precision's graphs must reach
PARITY_THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}
CUDA_PROVIDER = "CUDAExecutionProvider"
# ops whose weights an int8 export quantizes (the ViT patch Conv stays fp32: see _quantize_int8)
INT8_OPS = ("MatMul", "Gather")

DEFAULT_SAMPLE_TEXTS = (
    "a photo of a cat",
    "",
    "A RED square on a BLUE background!!",
    "emoji 😀👍🏽, café &amp; crème brûlée",
    "a very long caption " + "that goes on and on " * 40,
    "12345 numbers, 3.14 and don't stop",
)


class ExportError(RuntimeError):
    """The exported ONNX graphs are invalid or do not reproduce the torch model."""


def _clean_mode(tokenizer: Any) -> Optional[str]:
    modes = {"lower": "_clean_lower", "whitespace": "_clean_whitespace", "canonicalize": "_clean_canonicalize"}
    for mode, attr in modes.items():
        fn = getattr(_oc_tokenizer, attr, None)
        if fn is not None and getattr(tokenizer, "clean_fn", None) is fn:
            return mode
    return None


def tokenizer_settings(bundle: ClipBundle) -> TokenizerSpec:
    """The ``tokenizer`` section of ``model.json`` for a bundle, refusing tokenizers the runtime cannot serve.

    Raises:
        ValueError: a tokenizer other than open_clip's ``SimpleTokenizer`` (CLIP BPE) or ``HFTokenizer`` (a fast
            Hugging Face tokenizer), a token-reduction mask, extra special tokens or a vocab other than CLIP's BPE,
            OpenCLIP's ``clips`` tokenizer mode, or no pad token — names the arch and the tokenizer type.
    """
    tok = bundle.tokenizer
    arch = bundle.spec.arch
    kind = type(tok).__name__
    if not isinstance(tok, (_oc_tokenizer.SimpleTokenizer, _oc_tokenizer.HFTokenizer)):
        raise ValueError(
            f"model {arch!r} uses a {kind} tokenizer; cliptuner's ONNX runtime serves the CLIP BPE tokenizer "
            "(open_clip SimpleTokenizer) and Hugging Face tokenizers (open_clip HFTokenizer), so this arch cannot "
            "be exported"
        )
    clean = _clean_mode(tok)
    if clean is None:
        raise ValueError(
            f"model {arch!r}: its {kind} uses a text cleaning function the runtime does not know "
            f"({getattr(tok, 'clean_fn', None)!r})"
        )
    if isinstance(tok, _oc_tokenizer.HFTokenizer):
        return _hf_settings(tok, arch, clean, int(bundle.context_length))
    if getattr(tok, "reduction_fn", None) is not None:
        raise ValueError(
            f"model {arch!r}: its {kind} uses a token reduction mask, which the runtime does not implement"
        )
    if len(getattr(tok, "all_special_ids", ())) != 2 or len(tok.encoder) != 49408:
        raise ValueError(
            f"model {arch!r}: its {kind} has extra special tokens or a non-standard vocab "
            f"({len(tok.encoder)} entries); the runtime serves the plain CLIP BPE vocab only"
        )
    return TokenizerSpec(vocab=VOCAB_FILE, context_length=int(bundle.context_length), clean=clean)


def _hf_settings(tok: Any, arch: str, clean: str, context_length: int) -> TokenizerSpec:
    """``model.json``'s tokenizer section for open_clip's ``HFTokenizer`` (padded to the context length)."""
    if getattr(tok, "tokenizer_mode", ""):
        raise ValueError(
            f"model {arch!r}: its HFTokenizer uses tokenizer_mode {tok.tokenizer_mode!r}, which the runtime does "
            "not implement (only the standard mode: padding and truncation to the context length)"
        )
    hf = tok.tokenizer
    if hf.pad_token_id is None:
        raise ValueError(f"model {arch!r}: its Hugging Face tokenizer has no pad token, so rows cannot be padded")
    return TokenizerSpec(
        kind="hf",
        vocab=HF_TOKENIZER_FILE,
        context_length=context_length,
        clean=clean,
        pad_id=int(hf.pad_token_id),
        padding_side=str(getattr(hf, "padding_side", "right") or "right"),
        truncation_side=str(getattr(hf, "truncation_side", "right") or "right"),
        strip_sep_id=int(hf.sep_token_id) if tok.strip_sep_token and hf.sep_token_id is not None else None,
    )


def write_tokenizer_files(bundle: ClipBundle, spec: TokenizerSpec, out_dir: str | Path) -> ClipTokenizer | HfTokenizer:
    """Put what the serving tokenizer reads into ``out_dir`` and build it from there.

    ``clip_bpe``: the BPE vocab open_clip ships. ``hf``: ``tokenizer.json`` (with ``tokenizer_config.json`` and
    ``special_tokens_map.json``, so the directory also loads with ``transformers``), saved from open_clip's
    tokenizer.

    Raises:
        ValueError: the Hugging Face tokenizer cannot be saved as a ``tokenizer.json`` (a slow, Python-only one).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.kind == "clip_bpe":
        shutil.copyfile(_oc_tokenizer.default_bpe(), out / spec.vocab)
        return load_tokenizer(spec, out)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        bundle.tokenizer.tokenizer.save_pretrained(tmp)
        saved = Path(tmp)
        if not (saved / HF_TOKENIZER_FILE).is_file():
            raise ValueError(
                f"model {bundle.spec.arch!r}: its Hugging Face tokenizer ({type(bundle.tokenizer.tokenizer).__name__}) "
                f"saves no {HF_TOKENIZER_FILE} (not a fast tokenizer), which the runtime needs"
            )
        for name in (HF_TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"):
            if (saved / name).is_file():
                shutil.copyfile(saved / name, out / name)
    return load_tokenizer(spec, out)


def build_manifest(bundle: ClipBundle, **extra: Any) -> ModelManifest:
    """Everything :class:`cliptuner.model.runtime.OnnxClip` needs to serve the exported model without torch.

    Args:
        bundle: the model and its transforms.
        **extra: more JSON-able keys: ``version``, ``parent_version`` and ``report`` set those manifest fields,
            any other key that is not a manifest field (``role``…) is kept in ``ModelManifest.extra``.

    Returns:
        The manifest, without the export results (``opset``, ``exporter``, ``parity``, ``checkpoint``) that
        :func:`export_model_dir` fills in.

    Raises:
        ValueError: an unsupported tokenizer or image preprocessing, or an extra key that clashes or is not JSON-able.
    """
    tokenizer = tokenizer_settings(bundle)
    cfg = bundle.preprocess_cfg()
    if cfg["resize_mode"] not in RESIZE_MODES:
        raise ValueError(
            f"model {bundle.spec.arch!r} uses resize_mode {cfg['resize_mode']!r}; the runtime implements "
            f"{list(RESIZE_MODES)}"
        )
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise ValueError(
            f"model {bundle.spec.arch!r} uses interpolation {cfg['interpolation']!r}; the runtime "
            f"implements {list(INTERPOLATIONS)}"
        )
    core = sorted({f.name for f in dataclasses.fields(ModelManifest)} - {"extra", *LINEAGE_KEYS})
    clashes = sorted(set(extra) & set(core))
    if clashes:
        raise ValueError(f"metadata extra keys {clashes} would replace core keys; core keys: {core}")
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata extra {key!r} is not JSON-serialisable: {exc}") from exc
    lineage = {key: extra.pop(key) for key in LINEAGE_KEYS if key in extra}
    return ModelManifest(
        arch=bundle.spec.arch,
        pretrained=bundle.spec.pretrained,
        force_quick_gelu=bundle.spec.force_quick_gelu,
        embed_dim=int(bundle.embed_dim),
        image_size=int(cfg["image_size"]),
        mean=[float(v) for v in cfg["mean"]],
        std=[float(v) for v in cfg["std"]],
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
        fill_color=int(cfg["fill_color"]) if cfg["resize_mode"] == "longest" else None,
        tokenizer=tokenizer,
        logit_scale=_logit("logit_scale", bundle.model, exp=True),
        logit_bias=_logit("logit_bias", bundle.model),
        onnx=OnnxSpec.standard(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        **lineage,
        extra=copy.deepcopy(extra),
    )


def _logit(name: str, model: torch.nn.Module, exp: bool = False) -> Optional[float]:
    """The model's ``logit_scale`` (exponentiated) or ``logit_bias`` as a float, None when it has none."""
    value = getattr(getattr(model, "module", model), name, None)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        return None
    value = value.detach().float().cpu()
    return round(float(value.exp() if exp else value), 6)


class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values, normalize=True)  # [batch, embed_dim]


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=True)  # [batch, embed_dim]


@contextlib.contextmanager
def _export_ready(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode, on CPU, fp32, with the MHA fast path off; the caller's model is left as it was."""
    model = getattr(model, "module", model)  # DDP
    tensors = list(model.parameters()) + list(model.buffers())
    on_cpu_fp32 = all(
        t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32) for t in tensors
    )
    if not on_cpu_fp32:
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield model
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def _export_tower(
    module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, opset: int, exporter: str
) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        # MHA's shape assertions become trace constants; the parity check at other batch sizes proves them harmless
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.functional")
        if exporter == "torchscript":
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[OUTPUT],
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
                dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
        else:
            try:
                import onnxscript  # noqa: F401
            except ImportError as exc:
                raise ImportError("exporter='dynamo' needs onnxscript: pip install onnxscript") from exc
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[OUTPUT],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )


def generate_sample_images(count: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Deterministic test pictures (gradient background, rectangles and discs) of differing aspect ratios.

    Returns:
        ``count`` uint8 arrays ``[H, W, 3]``.
    """
    rng = np.random.default_rng(seed)
    sizes = [(240, 320), (300, 200), (256, 256), (180, 400)]
    images = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.empty((h, w, 3), dtype=np.float32)
        start, end = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        t = (xx / max(w - 1, 1) + yy / max(h - 1, 1)) / 2
        image[:] = start * (1 - t[..., None]) + end * t[..., None]
        for _ in range(4):
            colour = rng.uniform(0, 255, size=3)
            if rng.random() < 0.5:
                y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
                image[y0 : y0 + rng.integers(h // 8, h // 2), x0 : x0 + rng.integers(w // 8, w // 2)] = colour
            else:
                cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(min(h, w) // 10, min(h, w) // 3)
                image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def _onnx_embed(path: Path, feeds_list: list[dict[str, np.ndarray]], cuda: bool = False) -> list[np.ndarray]:
    """Run one ONNX graph on each of several feeds (one session: creating them is what costs), on CPU or, with
    ``cuda``, on the CUDA provider only."""
    providers = [CUDA_PROVIDER] if cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    return [session.run(None, feeds)[0] for feeds in feeds_list]


def _cuda_usable() -> bool:
    """Whether onnxruntime can run a graph on CUDA here (an fp16 graph is checked there: ORT's CPU provider does
    not run the float16 graphs of CLIP towers)."""
    return CUDA_PROVIDER in ort.get_available_providers()


def _quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization of the weight matrices and the token-embedding table.

    The choices, measured on ViT-B-32 (random init, batch 32, 2 ORT threads, AVX2 CPU without VNNI; scratch
    runs alternating the variants in one process, see :data:`INT8_OPS`):

    - ``op_types_to_quantize=INT8_OPS``: every ``MatMul`` with a constant weight (ORT turns the towers' ``Gemm``
      into ``MatMul`` first) and the ``Gather`` of the token embedding (a quarter of the textual graph's bytes).
      The ViT patch-embedding ``Conv`` stays fp32: quantized it becomes ``ConvInteger``, which has no fast CPU
      kernel and by itself cost about a fifth of the int8 image speed-up (image encode 1.49× fp32 with it,
      1.63× without).
    - ``per_channel=True, reduce_range=True``: 7-bit weights, one scale per output column. ORT's u8×s8 kernels on
      AVX2 and AVX-512 CPUs without VNNI add pairs of products in saturating 16-bit arithmetic; 8-bit weights
      overflow it, and the plain conversion left the ViT-B-32 image tower at min cosine 0.980 vs fp32 (below
      :data:`PARITY_THRESHOLDS` ``int8``). Seven bits cannot overflow it; per-channel scales win back the bit
      lost: min cosine 0.9997, at the same speed. (``QUInt8`` weights avoid the overflow too, with min cosine
      0.9998, but run through ORT's slower u8×u8 kernels: 1.31× instead of 1.58×.)
    - No offline transformer fusion (``onnxruntime.transformers.optimizer``): the session's own graph
      optimizations already fuse GELU, bias-GELU and skip-LayerNorm, and its attention fusion does not match the
      traced ``multi_head_attention_forward``; fp32 with it ran at 0.98× fp32 without.

    Result there: image encode 1.6× fp32 (paired medians 1.58–1.65), min cosine 0.9997. The int8 matrix products
    run about 2.2× their fp32 form; the ops left in fp32 (patch Conv, GELU, LayerNorm, softmax, transposes; a tenth
    of the fp32 time) cap the whole; CPUs with VNNI or AMX should run the int8 products faster (not measured).
    Text encode: 1.6× fp32, min cosine 0.998. Measure with ``python benchmarks/precision.py --no-recall``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=list(INT8_OPS),
        per_channel=True,
        reduce_range=True,
    )


def convert_precision(path: Path, precision: str) -> None:
    """Rewrite the fp32 graph at ``path`` in ``precision``, in place.

    ``int8``: ONNX Runtime's dynamic quantization (int8 weights, activations quantized per batch at run time), for
    CPU serving; :func:`_quantize_int8` says which ops and settings, and why. ``fp16``: float16 weights and
    arithmetic with float32 inputs and outputs, for CUDA serving.
    """
    tmp = path.with_name(f".{path.name}.{precision}")
    try:
        if precision == "int8":
            _quantize_int8(path, tmp)
        elif precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(tmp))
        else:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)  # [batch]


def _compare(
    tower: str,
    path: Path,
    input_name: str,
    inputs: np.ndarray,
    expected: np.ndarray,
    threshold: float,
    cuda: bool = False,
) -> dict[str, Any]:
    """Run ONNX on the whole batch and on its first row alone; both must match torch row by row."""
    full, single = _onnx_embed(path, [{input_name: inputs}, {input_name: inputs[:1]}], cuda)
    if full.shape != expected.shape or single.shape != expected[:1].shape:
        raise ExportError(
            f"{tower} tower: ONNX output shapes {full.shape} / {single.shape} differ from torch's "
            f"{expected.shape} / {expected[:1].shape}"
        )
    cosines = np.concatenate([_row_cosines(expected, full), _row_cosines(expected[:1], single)])
    min_cosine = float(cosines.min())
    if not min_cosine >= threshold:  # also catches NaN
        raise ExportError(
            f"{tower} tower parity check failed: min cosine similarity ONNX vs torch {min_cosine:.6f} "
            f"< threshold {threshold} ({path.name})"
        )
    return {
        "min_cosine": min_cosine,
        "max_abs_diff": float(np.abs(expected - full).max()),
        "batch_sizes": [int(inputs.shape[0]), 1],
    }


def _checked_opset(exporter: str, precision: str, parity_threshold: float, opset: int) -> int:
    """Refuse unknown export options; the opset the exporter writes (``dynamo`` needs at least 18).

    Raises:
        ValueError: an unknown exporter or precision, or a threshold outside (0, 1].
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if not 0.0 < parity_threshold <= 1.0:
        raise ValueError(f"parity_threshold must be in (0, 1], got {parity_threshold!r}")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        logger.info(
            "exporter='dynamo' emits opset >= %d; using %d instead of %d", DYNAMO_MIN_OPSET, DYNAMO_MIN_OPSET, opset
        )
        return DYNAMO_MIN_OPSET
    return opset


def _write_towers(
    model: torch.nn.Module,
    tokenizer: ClipTokenizer | HfTokenizer,
    image_size: int,
    visual_path: Path,
    textual_path: Path,
    opset: int,
    exporter: str,
) -> None:
    """Trace both towers of an export-ready ``model`` into their ONNX files and run ``onnx.checker`` on them.

    Raises:
        ExportError: ``onnx.checker`` rejects a graph (names the file).
    """
    example_pixels = torch.randn(TRACE_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    example_ids = torch.from_numpy(tokenizer(["a photo of a dog", "two cats on a red sofa"]))
    _export_tower(_ImageTower(model).eval(), example_pixels, visual_path, IMAGE_INPUT, opset, exporter)
    _export_tower(_TextTower(model).eval(), example_ids, textual_path, TEXT_INPUT, opset, exporter)
    for path in (visual_path, textual_path):
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{path.name} fails onnx.checker: {exc}") from exc


@dataclasses.dataclass
class _ParitySamples:
    """The parity check's inputs, prepared as the runtime prepares them, and torch's embeddings of them."""

    pixels: np.ndarray  # [N, 3, H, W]
    ids: np.ndarray  # [M, context_length]
    torch_img: np.ndarray  # [N, embed_dim]
    torch_txt: np.ndarray  # [M, embed_dim]

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        tokenizer: ClipTokenizer | HfTokenizer,
        reference_tokenizer: Any,
        preprocess_cfg: dict[str, Any],
        sample_images: Optional[Sequence[ImageSource]],
        sample_texts: Optional[Sequence[str]],
    ) -> _ParitySamples:
        """Decode, preprocess and tokenize the samples (the defaults when None) and embed them with torch.

        The graphs will get ``tokenizer``'s ids (the serving tokenizer); torch gets ``reference_tokenizer``'s
        (open_clip's, what the model was trained with), and the two must be equal.

        Raises:
            ValueError: no sample image or no sample text.
            ExportError: the serving tokenizer's ids differ from open_clip's (names the text and both rows).
        """
        images = list(sample_images) if sample_images is not None else generate_sample_images()
        texts = list(sample_texts) if sample_texts is not None else list(DEFAULT_SAMPLE_TEXTS)
        if not images or not texts:
            raise ValueError("the parity check needs at least one sample image and one sample text")
        pil = [decode_image(img, DEFAULT_LIMITS, name=f"parity sample #{i}") for i, img in enumerate(images)]
        size, mean, std = preprocess_cfg["image_size"], preprocess_cfg["mean"], preprocess_cfg["std"]
        geometry = (preprocess_cfg["interpolation"], preprocess_cfg["resize_mode"], preprocess_cfg["fill_color"])
        pixels = preprocess(pil, size, mean, std, *geometry)  # [N, 3, H, W]
        ids = tokenizer(texts)  # [M, context_length]
        reference = np.asarray(reference_tokenizer(texts), dtype=np.int64)  # [M, context_length]
        if reference.shape != ids.shape or not np.array_equal(reference, ids):
            row = next((i for i in range(len(texts)) if not np.array_equal(ids[i], reference[i])), 0)
            raise ExportError(
                f"the serving tokenizer ({type(tokenizer).__name__}) gives other ids than open_clip's for sample "
                f"text #{row} {texts[row][:60]!r}: {ids[row].tolist()} vs {reference[row].tolist()}"
            )
        with torch.no_grad():
            torch_img = model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
            torch_txt = model.encode_text(torch.from_numpy(reference), normalize=True).numpy()
        return cls(pixels, ids, torch_img, torch_txt)

    def compare(
        self, visual_path: Path, textual_path: Path, threshold: float, cuda: bool = False
    ) -> dict[str, dict[str, Any]]:
        """``{"visual": ..., "textual": ...}`` of :func:`_compare` for both graphs.

        Raises:
            ExportError: a tower misses ``threshold``.
        """
        return {
            "visual": _compare("visual", visual_path, IMAGE_INPUT, self.pixels, self.torch_img, threshold, cuda),
            "textual": _compare("textual", textual_path, TEXT_INPUT, self.ids, self.torch_txt, threshold, cuda),
        }


def _converted_parity(
    precision: str, samples: _ParitySamples, visual_path: Path, textual_path: Path, fp32_parity: dict[str, Any]
) -> dict[str, Any]:
    """The parity of graphs converted to ``precision`` against torch, with the fp32 graphs' under ``"fp32"``.

    An fp16 check is recorded as not run where onnxruntime has no CUDA provider.

    Raises:
        ExportError: a converted tower misses its :data:`PARITY_THRESHOLDS` value.
    """
    parity = {"precision": precision, "fp32": fp32_parity}
    if precision == "fp16" and not _cuda_usable():
        parity.update(
            checked=False,
            reason="fp16 graphs run on CUDA and onnxruntime has no CUDA provider here; check them where it has",
        )
        return parity
    threshold = PARITY_THRESHOLDS[precision]
    cuda = precision == "fp16"
    parity.update(
        checked=True,
        threshold=threshold,
        device="cuda" if cuda else "cpu",
        **samples.compare(visual_path, textual_path, threshold, cuda),
    )
    logger.info(
        "%s ONNX parity: visual min cosine %.5f, textual min cosine %.5f",
        precision,
        parity["visual"]["min_cosine"],
        parity["textual"]["min_cosine"],
    )
    return parity


def export_onnx(
    bundle: ClipBundle,
    out_dir: str | Path,
    opset: int = 17,
    check_parity: bool = True,
    parity_threshold: float = 0.9999,
    sample_images: Optional[Sequence[ImageSource]] = None,
    sample_texts: Optional[Sequence[str]] = None,
    exporter: str = "torchscript",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Write ``visual.onnx`` and ``textual.onnx`` into ``out_dir`` and prove they match torch.

    Args:
        bundle: the model (any device/precision/mode; it is exported as an fp32 CPU eval copy and left unchanged).
        out_dir: destination directory (created if missing).
        opset: ONNX opset (``exporter="dynamo"`` raises it to at least 18).
        check_parity: compare ONNX with torch on ``sample_images`` / ``sample_texts``.
        parity_threshold: minimum per-row cosine similarity between the fp32 ONNX graphs and torch.
        sample_images: images (any :data:`cliptuner.model.images.ImageSource`) for the check; deterministic generated
            pictures by default. The check runs the whole set and its first item alone (batch 1, never the
            traced batch of 2), so it also proves the dynamic batch axis.
        sample_texts: texts for the check; a varied default set (empty, long, unicode…).
        exporter: ``torchscript`` (default) or ``dynamo`` (needs onnxscript).
        precision: ``fp32``; ``int8`` (dynamic quantization, for CPU serving) or ``fp16`` (for CUDA serving):
            the graphs are exported in fp32, checked, then converted (:func:`convert_precision`) and checked again
            against torch with :data:`PARITY_THRESHOLDS` of that precision. An fp16 graph can only be checked
            where onnxruntime runs CUDA; elsewhere its check is recorded as not run.

    Returns:
        ``{"visual": path, "textual": path, "opset", "exporter", "embed_dim", "precision", "parity"}`` where
        ``parity`` is ``{"threshold", "visual": {"min_cosine", "max_abs_diff", "batch_sizes"}, "textual": {...}}``
        or None; for int8 and fp16 it is the converted graphs', with the fp32 graphs' under ``"fp32"`` (an fp16
        check that could not run: ``{"precision": "fp16", "checked": False, "reason": ...}``).

    Raises:
        ValueError: an unsupported tokenizer, exporter or threshold.
        ExportError: ``onnx.checker`` rejects a graph, or a tower misses the parity threshold (names the tower
            and the value).
    """
    opset = _checked_opset(exporter, precision, parity_threshold, opset)
    tokenizer = write_tokenizer_files(bundle, tokenizer_settings(bundle), out_dir)
    cfg = bundle.preprocess_cfg()
    out = Path(out_dir)
    visual_path, textual_path = out / VISUAL_FILE, out / TEXTUAL_FILE

    with _export_ready(bundle.model) as model:
        _write_towers(model, tokenizer, cfg["image_size"], visual_path, textual_path, opset, exporter)
        logger.info("exported %s to %s (%s, opset %d)", bundle.spec.arch, out, exporter, opset)

        parity = None
        if check_parity:
            samples = _ParitySamples.build(model, tokenizer, bundle.tokenizer, cfg, sample_images, sample_texts)
            parity = {
                "threshold": parity_threshold,
                "tokenizer": {"texts": len(samples.ids), "ids_equal": True},
                **samples.compare(visual_path, textual_path, parity_threshold),
            }
            logger.info(
                "ONNX parity: visual min cosine %.7f, textual min cosine %.7f",
                parity["visual"]["min_cosine"],
                parity["textual"]["min_cosine"],
            )
        if precision != "fp32":
            for path in (visual_path, textual_path):
                convert_precision(path, precision)
            if check_parity:
                parity = _converted_parity(precision, samples, visual_path, textual_path, parity)
    return {
        "visual": str(visual_path),
        "textual": str(textual_path),
        "opset": opset,
        "exporter": exporter,
        "embed_dim": int(bundle.embed_dim),
        "precision": precision,
        "parity": parity,
    }


def export_model_dir(
    bundle: ClipBundle,
    out_dir: str | Path,
    *,
    checkpoint: bool = True,
    metadata_extra: Optional[dict[str, Any]] = None,
    **export_kwargs: Any,
) -> Path:
    """Write a complete model directory: ONNX towers, ``model.json``, the BPE vocab and a checkpoint.

    ``model.json`` is written last (by rename), so a directory that has it is complete. The result is what
    :meth:`cliptuner.model.registry.Registry.publish` takes and what :class:`cliptuner.model.runtime.OnnxClip` serves.

    Args:
        bundle: the model to export.
        out_dir: destination directory (created if missing; a temp dir that a registry then publishes).
        checkpoint: also write ``checkpoint.pt`` (:func:`cliptuner.train.models.save_checkpoint`), so the version can
            be fine-tuned further or re-exported.
        metadata_extra: more ``model.json`` keys (``parent_version``, ``report``…).
        **export_kwargs: passed to :func:`export_onnx` (``opset``, ``parity_threshold``, ``sample_images``…).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: an unsupported tokenizer / preprocessing or bad metadata (before anything is written).
        ExportError: the ONNX graphs fail the checker or the parity check.
    """
    manifest = build_manifest(bundle, **(metadata_extra or {}))
    out = Path(out_dir)
    result = export_onnx(bundle, out, **export_kwargs)  # writes the tokenizer files too
    manifest.opset = result["opset"]
    manifest.exporter = result["exporter"]
    manifest.precision = result["precision"]
    manifest.parity = result["parity"]
    manifest.checkpoint = CHECKPOINT_FILE if checkpoint else None
    if checkpoint:
        save_checkpoint(out / CHECKPOINT_FILE, bundle.model, bundle.spec)
    manifest.write(out)
    return out
