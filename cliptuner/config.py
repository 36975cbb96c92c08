"""Configuration dataclasses for the cliptuner core.

User-facing options are declared with :func:`cliptuner.options.option` (default, help, where reachable); the
CLI flags, the ``/train`` parameter names and config files derive from those fields. Each dataclass validates
itself in ``__post_init__`` and raises a ``ValueError`` that names the bad value and what is allowed, so a
mistake surfaces where it is made rather than deep inside training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from cliptuner.options import cast_value, option

PRECISIONS = ("fp32", "amp", "amp_bf16")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # cliptuner.model.manifest.PRECISIONS (config stays free of the manifest)
SCHEDULERS = ("cosine", "constant")
METRIC_NAMES = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def from_mapping(cls: type, values: Mapping[str, Any]) -> Any:
    """Build a config dataclass from a mapping, rejecting unknown keys by name.

    Values are cast to the field's annotated type (:func:`cliptuner.options.cast_value`): whole floats for
    integer fields (protobuf Structs carry every number as a float), ints for float fields, lists for sequences.

    Args:
        cls: the dataclass type to build.
        values: field name → value.

    Returns:
        An instance of ``cls``.

    Raises:
        ValueError: on an unknown key or a value of the wrong type.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(fields)}")
    return cls(**{name: cast_value(cls, name, value) for name, value in values.items()})


@dataclass
class ModelSpec:
    """Which OpenCLIP model to build and where its weights come from."""

    arch: str = "cliptuner-tiny"  # OpenCLIP model name (``ViT-B-32``) or a bundled config (``cliptuner-tiny``)
    pretrained: Optional[str] = None  # OpenCLIP tag (``openai``), a local checkpoint path, or None for random init
    cache_dir: Optional[str] = None  # where OpenCLIP keeps downloaded weights (HF cache when None)
    force_quick_gelu: bool = False  # use QuickGELU, as OpenAI-trained weights expect

    def __post_init__(self) -> None:
        _check(
            isinstance(self.arch, str) and bool(self.arch.strip()),
            f"arch must be a non-empty string, got {self.arch!r}",
        )
        if self.pretrained is not None:
            _check(isinstance(self.pretrained, str), f"pretrained must be a string or None, got {self.pretrained!r}")
            if not self.pretrained.strip():
                self.pretrained = None


@dataclass
class TrainConfig:
    """Options of one fine-tuning run.

    Each option is declared once, here: its help text and where it is reachable (``cli``: a ``cliptuner train``
    flag, ``request``: a ``/train`` parameter) live in the field's metadata (:func:`cliptuner.options.option`),
    from which the CLI flags, the ``/train`` parameter names and config files are derived.
    """

    epochs: int = option(5, "passes over the training pairs")
    batch_size: int = option(
        64, "pairs per forward pass (per process); an optimizer step sees batch_size * accum_steps * world size pairs"
    )
    learning_rate: float = option(1e-4, "peak learning rate of AdamW", flags=("--lr", "--learning-rate"))
    weight_decay: float = option(
        0.1,
        "AdamW weight decay, as OpenCLIP applies it: every weight matrix is "
        "decayed (token and positional embeddings included), gains, biases, norms "
        "and the logit scale are not",
    )
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2 (CLIP's choice, steadier than 0.999 with large batches)")
    eps: float = option(1e-6, "AdamW epsilon")
    warmup_steps: int = option(10, "linear warmup length in optimizer steps")
    scheduler: str = option("cosine", "learning-rate shape after warmup", choices=SCHEDULERS)
    accum_steps: int = option(
        1,
        "micro-batches per optimizer step; features are accumulated so that the loss "
        "sees the negatives of the whole effective batch (batch_size * accum_steps), "
        "as OpenCLIP's accum_freq",
    )
    grad_clip_norm: Optional[float] = option(1.0, "clip the global gradient norm to this; none disables")
    lock_image: bool = option(False, "freeze the image tower")
    lock_text: bool = option(False, "freeze the text tower")
    image_unlocked_groups: int = option(0, "with lock_image: keep the last N layer groups of the image tower trainable")
    text_unlocked_layers: int = option(
        0,
        "with lock_text: keep the last N groups of the text tower trainable "
        "(OpenCLIP's groups, from the top: projection; last block + final "
        "norm; earlier blocks; embeddings)",
    )
    layer_decay: float = option(1.0, "layer-wise lr decay: layer l of L gets lr * decay**(L - l); 1.0 disables")
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    precision: str = option(
        "amp", "fp32, amp (fp16 autocast on CUDA) or amp_bf16; AMP falls back to fp32 on CPU", choices=PRECISIONS
    )
    device: str = option("cpu", "torch device string: cpu, cuda, cuda:1", cli=False, request=False)
    #   cli=False: the CLI's --device defaults to CUDA when there is one (and to the LOCAL_RANK GPU under
    #   torchrun); request=False: the tuner trains where its service was placed.
    seed: int = option(0, "seeds torch, numpy, the batch sampler and the held-out split")
    num_workers: int = option(0, "DataLoader worker processes", flags=("--workers", "--num-workers"), request=False)
    #   request=False: worker processes are forked on the serving host; how many is the operator's choice
    #   (like the tuner's device and torch_threads), not a client's.
    eval_every: int = option(1, "evaluate every N epochs (0: only at the end)")
    early_stop_patience: Optional[int] = option(
        None,
        "stop after N evaluations without improvement (chosen on val_fraction of the training images); none disables",
    )
    early_stop_metric: str = option(
        "t2i_r5", "metric watched for early stopping and the best checkpoint", choices=METRIC_NAMES
    )
    keep_best: bool = option(
        False, "restore the weights of the best evaluation at the end (chosen on val_fraction of the training images)"
    )
    val_fraction: float = option(
        0.1,
        "with keep_best or early stopping: share of the TRAINING images set aside "
        "to choose the epoch, so that the held-out split that reports before/after "
        "is never used to choose",
    )
    log_every: int = option(10, "emit a progress line every N optimizer steps", cli=False, request=False)
    #   cli=False and request=False: the CLI's progress bar and the tuner's /status choose it.
    wiseft_alphas: Sequence[float] = option(
        (), "WiSE-FT: also report held-out (and general) recall of (1-a)*base + a*tuned at these alphas"
    )
    wiseft_alpha: Optional[float] = option(
        None, "WiSE-FT: keep (1-a)*base + a*tuned as the result (exported); none keeps the tuned weights"
    )
    export_precision: str = option(
        "fp32",
        "precision of the exported ONNX model: fp32; int8 (dynamic "
        "quantization, for CPU serving: its held-out recall is reported next to "
        "fp32's); fp16 (for CUDA serving)",
        choices=EXPORT_PRECISIONS,
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accum_steps"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _check(self.batch_size >= 2, f"batch_size must be >= 2 for a contrastive loss, got {self.batch_size}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must be in [0, 1), got {(self.beta1, self.beta2)}")
        _check(self.eps > 0, f"eps must be > 0, got {self.eps!r}")
        _check(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"warmup_steps must be >= 0, got {self.warmup_steps!r}",
        )
        _check(self.scheduler in SCHEDULERS, f"scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        _check(self.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        _check(
            self.export_precision in EXPORT_PRECISIONS,
            f"export_precision must be one of {list(EXPORT_PRECISIONS)}, got {self.export_precision!r}",
        )
        _check(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"grad_clip_norm must be > 0 or None, got {self.grad_clip_norm!r}",
        )
        _check(
            not (
                self.lock_image
                and self.lock_text
                and self.image_unlocked_groups == 0
                and self.text_unlocked_layers == 0
            ),
            "lock_image and lock_text together leave nothing to train",
        )
        for name in ("image_unlocked_groups", "text_unlocked_layers"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        _check(
            self.image_unlocked_groups == 0 or self.lock_image,
            "image_unlocked_groups only applies with lock_image=True",
        )
        _check(
            self.text_unlocked_layers == 0 or self.lock_text, "text_unlocked_layers only applies with lock_text=True"
        )
        _check(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay!r}")
        _check(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers!r}")
        _check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every!r}")
        _check(
            self.early_stop_patience is None or self.early_stop_patience >= 1,
            f"early_stop_patience must be >= 1 or None, got {self.early_stop_patience!r}",
        )
        _check(
            self.early_stop_metric in METRIC_NAMES,
            f"early_stop_metric must be one of {list(METRIC_NAMES)}, got {self.early_stop_metric!r}",
        )
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every!r}")
        _check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        self.wiseft_alphas = tuple(float(a) for a in self.wiseft_alphas)
        for alpha in self.wiseft_alphas + ((self.wiseft_alpha,) if self.wiseft_alpha is not None else ()):
            _check(0.0 <= alpha <= 1.0, f"WiSE-FT alphas must lie in [0, 1] (0: base, 1: tuned), got {alpha!r}")


@dataclass
class EvalConfig:
    """Options of retrieval evaluation and of the held-out split."""

    ks: Sequence[int] = field(default_factory=lambda: (1, 5, 10))  # recall@k cut-offs
    batch_size: int = 128  # images or texts per forward pass
    eval_fraction: float = option(
        0.2, "share of the images held out (with all their captions) when no eval data is given"
    )
    split_seed: int = 0  # seed of the held-out split (same seed → same split); the CLI and /train pass ``seed``

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        _check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), f"ks must be positive integers, got {self.ks!r}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        _check(0 < self.eval_fraction < 1, f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
