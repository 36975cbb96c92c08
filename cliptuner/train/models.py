"""Build OpenCLIP models, their preprocessing and tokenizer from a :class:`ModelSpec`.

Weights come from one of three places:

* an OpenCLIP pretrained tag (``ViT-B-32`` + ``openai``), resolved through OpenCLIP's own download path
  and its Hugging Face cache (``cache_dir`` or the HF default);
* a local checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``): either one written by
  :func:`save_checkpoint`, an OpenCLIP training checkpoint (``{"state_dict": ...}``), or a bare state dict;
* nothing: random initialisation (what tests and the offline demo use).

Small configs shipped in ``cliptuner/train/model_configs`` (``cliptuner-tiny``, ``cliptuner-small``) are
registered with OpenCLIP on import, so OpenCLIP's factory and our CLI accept their names.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cliptuner.config import ModelSpec
from cliptuner.model.atomic import atomic_path

logger = logging.getLogger(__name__)

BUNDLED_CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_FORMAT = "cliptuner-checkpoint-v1"

try:
    import open_clip
except ImportError as exc:  # pragma: no cover - dependency missing
    raise ImportError("cliptuner training needs open_clip: pip install open_clip_torch") from exc

open_clip.add_model_config(BUNDLED_CONFIG_DIR)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class ClipBundle:
    """An OpenCLIP model with everything needed to feed it and to describe it."""

    model: torch.nn.Module  # open_clip CLIP / CustomTextCLIP
    preprocess_train: Callable  # PIL image -> tensor [3, H, W], with augmentation
    preprocess_val: Callable  # PIL image -> tensor [3, H, W], deterministic
    tokenizer: Callable  # list[str] -> LongTensor [batch, context_length]
    spec: ModelSpec

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or self.model.context_length)

    @property
    def embed_dim(self) -> int:
        output_dim = getattr(self.model.visual, "output_dim", None)
        if output_dim:
            return int(output_dim)
        with torch.no_grad():  # towers without an output_dim attribute: measure it
            return int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess_cfg(self) -> dict[str, Any]:
        """Image preprocessing settings (size, mean, std, interpolation, resize mode, fill) as plain values."""
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        mean = cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN
        std = cfg.get("std") or open_clip.OPENAI_DATASET_STD
        return {
            "image_size": self.image_size,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "interpolation": cfg.get("interpolation") or "bicubic",
            "resize_mode": cfg.get("resize_mode") or "shortest",
            "fill_color": int(cfg.get("fill_color") or 0),
        }


def is_local_checkpoint(pretrained: Optional[str]) -> bool:
    """True when ``pretrained`` names a file on disk rather than an OpenCLIP tag."""
    return bool(pretrained) and (os.sep in pretrained or Path(pretrained).suffix != "" or Path(pretrained).is_file())


def cached_pretrained_file(arch: str, tag: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """The file OpenCLIP would load for ``arch`` + pretrained ``tag``, if it is already on disk; never downloads.

    Follows OpenCLIP's own resolution (``open_clip.pretrained.download_pretrained``): a tag with a Hugging Face
    hub entry (``org/repo/`` or ``org/repo/file``) is looked up in the HF cache (``cache_dir``, else
    ``HF_HOME``/``HF_HUB_CACHE``) with ``huggingface_hub.try_to_load_from_cache``, the ``.safetensors``
    alternative first as OpenCLIP tries it; a tag with only a URL is looked up in ``cache_dir`` or
    ``~/.cache/clip``. No network is used.

    Args:
        arch: OpenCLIP model name (``ViT-B-32``).
        tag: its pretrained tag (``openai``).
        cache_dir: the ``cache_dir`` that :func:`load_model` would pass to OpenCLIP (``ModelSpec.cache_dir``).

    Returns:
        The path of the cached weights, or None when they are not on disk.

    Raises:
        ValueError: ``tag`` is not a pretrained tag of ``arch`` (the message lists the known ones).
    """
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ValueError(
            f"unknown pretrained tag {tag!r} for {arch!r}; "
            f"known: {sorted(open_clip.list_pretrained_tags_by_model(arch))}"
        )
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub") or ""
    if hub and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        if filename == HF_WEIGHTS_NAME:
            names = [HF_SAFE_WEIGHTS_NAME, filename]
        elif filename.endswith((".bin", ".pth")):
            names = [filename[:-4] + ".safetensors", filename]
        else:
            names = [filename]
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = cfg.get("url") or ""
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return path if os.path.isfile(path) else None
    return None


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> ClipBundle:
    """Build the model, transforms and tokenizer named by ``spec``.

    Args:
        spec: arch and weights source.
        device: where to put the model.

    Returns:
        A :class:`ClipBundle` in eval mode.

    Raises:
        ValueError: unknown arch, unknown pretrained tag for this arch, or a missing checkpoint file.
    """
    known = set(open_clip.list_models())
    if spec.arch not in known and not spec.arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown model {spec.arch!r}; known: {sorted(known)}")

    checkpoint: Optional[dict] = None
    pretrained_tag: Optional[str] = None
    if spec.pretrained:
        if is_local_checkpoint(spec.pretrained):
            path = Path(spec.pretrained).expanduser()
            if not path.is_file():
                raise ValueError(f"checkpoint file {str(path)!r} does not exist")
            checkpoint = read_checkpoint(path)
            saved_arch = checkpoint.get("arch")
            if saved_arch and saved_arch != spec.arch:
                raise ValueError(f"checkpoint {str(path)!r} holds arch {saved_arch!r}, not {spec.arch!r}")
        else:
            tags = open_clip.list_pretrained_tags_by_model(spec.arch)
            if spec.pretrained not in tags:
                raise ValueError(
                    f"unknown pretrained tag {spec.pretrained!r} for {spec.arch!r}; known: {sorted(tags)} "
                    "(or give a local checkpoint path)"
                )
            pretrained_tag = spec.pretrained

    quiet = _DropRandomInitWarning() if pretrained_tag is None else None
    if quiet is not None:  # random init (or weights loaded below) is intended here: no root-logger warning
        logging.getLogger().addFilter(quiet)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            spec.arch,
            pretrained=pretrained_tag,
            device=device,
            force_quick_gelu=spec.force_quick_gelu,
            cache_dir=spec.cache_dir,
        )
    finally:
        if quiet is not None:
            logging.getLogger().removeFilter(quiet)
    if checkpoint is None and pretrained_tag is None:
        logger.info("%s initialised randomly", spec.arch)
    if checkpoint is not None:
        state_dict = checkpoint["state_dict"]
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {spec.pretrained!r} does not fit {spec.arch!r}: "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
            )
        logger.info("loaded local checkpoint %s into %s", spec.pretrained, spec.arch)
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.arch)
    return ClipBundle(
        model=model, preprocess_train=preprocess_train, preprocess_val=preprocess_val, tokenizer=tokenizer, spec=spec
    )


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint into ``{"state_dict": ..., **metadata}`` whatever its layout.

    Accepts files written by :func:`save_checkpoint`, OpenCLIP training checkpoints and bare state dicts
    (``.safetensors`` too). A ``module.`` prefix left by DDP is stripped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Any = {"state_dict": load_file(str(path))}
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(raw).__name__}, not a state dict")
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):
        checkpoint = dict(raw)
    else:
        checkpoint = {"state_dict": raw}
    state_dict = checkpoint["state_dict"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        checkpoint["state_dict"] = {k[len("module.") :]: v for k, v in state_dict.items()}
    return checkpoint


def save_checkpoint(path: str | Path, model: torch.nn.Module, spec: ModelSpec, **extra: Any) -> Path:
    """Write a checkpoint that :func:`load_model` reads back as ``ModelSpec(arch, pretrained=path)``.

    The file is written next to its final name and renamed, so a reader never sees half a checkpoint.

    Args:
        path: destination file.
        model: the model whose weights to save (a DDP wrapper is unwrapped).
        spec: the spec the model was built from (its arch is recorded).
        **extra: more JSON-able or tensor metadata (epoch, optimizer state, metrics…).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": spec.arch,
        "force_quick_gelu": spec.force_quick_gelu,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path
