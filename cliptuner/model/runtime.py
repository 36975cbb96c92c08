"""Serve an exported model with onnxruntime only: no torch, no open_clip.

:class:`OnnxClip` reads a model directory written by :func:`cliptuner.train.export.export_model_dir` (its
:class:`~cliptuner.model.manifest.ModelManifest`, the two ONNX graphs and the BPE vocab), decodes and preprocesses
images with :mod:`cliptuner.model.images`, tokenizes with the tokenizer ``model.json`` names (:mod:`cliptuner.model.hf_tokenizer`), and runs the two
sessions in minibatches. This module must stay importable without torch: it imports nothing from ``cliptuner.train.models``,
``cliptuner.train.export`` or ``cliptuner.train.data``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cliptuner.model.hf_tokenizer import load_tokenizer
from cliptuner.model.images import DEFAULT_LIMITS, ImageError, ImageLimits, ImageSource, decode_image, preprocess
from cliptuner.model.manifest import ModelManifest

logger = logging.getLogger(__name__)

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - dependency missing
    raise ImportError("serving needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu for CUDA)") from exc

DEVICES = ("auto", "cpu", "cuda")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
_ORT_ERROR = 3  # session log severity: errors only (hides ORT's provider fallback warnings)


def _parse_device(device: str) -> tuple[str, int]:
    if not isinstance(device, str):
        raise ValueError(f"device must be one of {list(DEVICES)} or 'cuda:N', got {device!r}")
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be one of {list(DEVICES)} or 'cuda:N', got {device!r}")
    return kind, int(index or 0)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class OnnxClip:
    """CLIP image and text encoders over two ONNX Runtime sessions.

    Thread-safe: concurrent ``encode_*`` calls share only the sessions (which ORT allows) and read-only state.

    Args:
        model_dir: a model directory (``model.json``, ``visual.onnx``, ``textual.onnx``, the vocab).
        device: ``auto`` (CUDA when onnxruntime can really use it, else CPU), ``cpu``, ``cuda`` or ``cuda:N``
            (CUDA or an error).
        intra_op_threads: threads per session for one operator; None lets ORT decide.
        batch_size: items per ``session.run``.
        limits: image size limits checked before decoding.

    Attributes:
        manifest: the directory's checked :class:`~cliptuner.model.manifest.ModelManifest` (read-only: the sessions and
            the tokenizer were built from it).

    Raises:
        ValueError: a bad model directory (see :meth:`ModelManifest.read <cliptuner.model.manifest.ModelManifest.read>`),
            device or batch size.
        RuntimeError: ``device="cuda"`` but onnxruntime cannot run on CUDA here, or an fp16 export (model.json's
            ``precision``) where CUDA is not usable.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        intra_op_threads: Optional[int] = None,
        batch_size: int = 32,
        limits: ImageLimits = DEFAULT_LIMITS,
    ) -> None:
        kind, device_id = _parse_device(device)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if intra_op_threads is not None and (not isinstance(intra_op_threads, int) or intra_op_threads < 1):
            raise ValueError(f"intra_op_threads must be an integer >= 1 or None, got {intra_op_threads!r}")
        self.model_dir = Path(model_dir)
        self.manifest = ModelManifest.read(self.model_dir)
        self.batch_size = batch_size
        self.limits = limits
        tok = self.manifest.tokenizer
        self.tokenizer = load_tokenizer(tok, self.model_dir)
        graphs = self.manifest.onnx
        precision = self.manifest.precision
        self._visual = self._session(self.model_dir / graphs.visual.file, kind, device_id, intra_op_threads, precision)
        self._textual = self._session(
            self.model_dir / graphs.textual.file, kind, device_id, intra_op_threads, precision
        )
        logger.info("serving %s (%s) on %s", self.version, self.manifest.arch, self.providers)

    @staticmethod
    def _session(
        path: Path, kind: str, device_id: int, threads: Optional[int], precision: str = "fp32"
    ) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = _ORT_ERROR
        if threads is not None:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if kind in ("auto", "cuda") and CUDA_PROVIDER in available:
            providers = [(CUDA_PROVIDER, {"device_id": device_id}), CPU_PROVIDER]
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as exc:  # ORT raises a bare RuntimeError/Fail when CUDA libraries are broken
                if kind == "cuda":
                    raise RuntimeError(
                        f"device='cuda' requested but onnxruntime could not create a CUDA session for "
                        f"{path.name}: {exc}"
                    ) from exc
                logger.info("CUDA session for %s failed (%s); using CPU", path.name, exc)
            else:
                if CUDA_PROVIDER in session.get_providers():
                    return session
                if kind == "cuda":
                    raise RuntimeError(
                        f"device='cuda' requested but onnxruntime fell back to {session.get_providers()} "
                        f"for {path.name}: the CUDA/cuDNN libraries onnxruntime-gpu needs are missing or "
                        "do not match"
                    )
                logger.info("CUDA provider listed but not usable for %s; using CPU", path.name)
        elif kind == "cuda":
            raise RuntimeError(
                f"device='cuda' requested but onnxruntime has no {CUDA_PROVIDER} (available: {available}); "
                "install onnxruntime-gpu on a machine with a CUDA GPU, or use device='cpu'"
            )
        if precision == "fp16":  # ORT's CPU provider does not run float16 CLIP graphs (it can crash the process)
            raise RuntimeError(
                f"{path.parent.name} is an fp16 export, for CUDA serving, and onnxruntime cannot run "
                "CUDA here; serve an fp32 or int8 export of it on the CPU (cliptuner export "
                "--precision int8)"
            )
        return ort.InferenceSession(str(path), sess_options=options, providers=[CPU_PROVIDER])

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of ``model.json`` (``self.manifest`` is the parsed form)."""
        return self.manifest.to_dict()

    @property
    def version(self) -> str:
        """The registry version (``model.json`` ``version``), else the directory name."""
        return str(self.manifest.version or self.model_dir.resolve().name)

    @property
    def embed_dim(self) -> int:
        return self.manifest.embed_dim

    @property
    def providers(self) -> list[str]:
        """Execution providers the sessions run on, preferred first (``["CPUExecutionProvider"]`` on CPU)."""
        return list(self._visual.get_providers())

    def text_feeds(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenized texts keyed by the textual graph's input name: ``{"input_ids": int64 [batch, context]}``."""
        return {self.manifest.onnx.textual.input: self.tokenizer(list(texts))}

    def image_feeds(
        self, images: Sequence[ImageSource], names: Optional[Sequence[str]] = None, offset: int = 0
    ) -> dict[str, np.ndarray]:
        """Decoded, preprocessed images keyed by the visual graph's input name.

        Args:
            images: paths, encoded bytes, ``H×W×3`` uint8 arrays or PIL images.
            names: how to name each item in errors (doc ids); defaults to its position and a description.
            offset: position of ``images[0]`` in the caller's list (for error messages).

        Returns:
            ``{"pixel_values": float32 [batch, 3, H, W]}``.

        Raises:
            ImageError: an item cannot be decoded or is over the limits (names the item).
        """
        decoded = []
        for i, image in enumerate(images):
            if names is not None:
                decoded.append(decode_image(image, self.limits, name=str(names[i])))
                continue
            try:
                decoded.append(decode_image(image, self.limits))
            except ImageError as exc:
                raise ImageError(f"item #{offset + i}: {exc}") from exc
        m = self.manifest
        pixels = preprocess(decoded, m.image_size, m.mean, m.std, m.interpolation, m.resize_mode, m.fill_color or 0)
        return {m.onnx.visual.input: pixels}

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Returns:
            L2-normalised float32 ``[len(texts), embed_dim]`` (``[0, embed_dim]`` for no texts).

        Raises:
            TypeError: an item is not a string.
        """
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, got a single str")
        texts = list(texts)
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)  # [N, embed_dim]
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            out[start : start + len(chunk)] = self._textual.run(None, self.text_feeds(chunk))[0]
        return _l2_normalise(out)

    def encode_images(self, images: Sequence[ImageSource], names: Optional[Sequence[str]] = None) -> np.ndarray:
        """Embed images, decoding one minibatch at a time (memory stays bounded by ``batch_size``).

        Args:
            images: paths, encoded bytes, ``H×W×3`` uint8 arrays or PIL images.
            names: one name per image for error messages (doc ids).

        Returns:
            L2-normalised float32 ``[len(images), embed_dim]`` (``[0, embed_dim]`` for no images).

        Raises:
            ImageError: an image cannot be decoded or is over the limits (names the item).
            ValueError: ``names`` has a different length than ``images``.
        """
        images = list(images)
        if names is not None and len(names) != len(images):
            raise ValueError(f"names has {len(names)} entries for {len(images)} images")
        out = np.empty((len(images), self.embed_dim), dtype=np.float32)  # [N, embed_dim]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            chunk_names = None if names is None else list(names[start : start + len(chunk)])
            feeds = self.image_feeds(chunk, chunk_names, offset=start)
            out[start : start + len(chunk)] = self._visual.run(None, feeds)[0]
        return _l2_normalise(out)
