"""The settings of the cliptuner core: training options, the ``/train`` parameters and their JSON Schema.

User-facing options are declared with :func:`cliptuner.options.option` (default, help, where reachable); the
CLI flags, the ``/train`` parameter names and config files derive from those fields. Each class is a strict
pydantic dataclass (:func:`cliptuner.options.config_dataclass`: a bool is not an int, a whole float is an int,
unknown keys are refused by name) that also checks itself in ``__post_init__``; every mistake is a ``ValueError``
that names the bad value and what is allowed, so it surfaces where it is made rather than deep inside training.

``python -m cliptuner.config --train-schema`` prints the JSON Schema of ``/train``'s parameters
(docs/train-parameters.schema.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any, Optional

import pydantic

from cliptuner.options import (
    CHOICES,
    HELP,
    cast_value,
    config_dataclass,
    default_of,
    option,
    request_names,
    validation_message,
)

PRECISIONS = ("fp32", "amp", "amp_bf16")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # cliptuner.model.manifest.PRECISIONS (config stays free of the manifest)
SCHEDULERS = ("cosine", "constant")
LOSSES = ("auto", "clip", "siglip")  # auto: siglip for a model with a logit bias (the SigLIP family), else clip
METRIC_NAMES = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def from_mapping(cls: type, values: Mapping[str, Any]) -> Any:
    """Build a config dataclass from a mapping, rejecting unknown keys by name.

    Values are cast to the field's annotated type by the class (:func:`cliptuner.options.cast_value`): whole floats
    for integer fields (protobuf Structs carry every number as a float), ints for float fields, lists for
    sequences.

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
    return cls(**values)


@config_dataclass
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


@config_dataclass
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
    loss: str = option(
        "auto",
        "contrastive loss: clip (softmax over the batch, both directions), siglip (sigmoid over every pair with a "
        "learnable bias); auto: what the model family was pretrained with (siglip for a model with a logit bias)",
        choices=LOSSES,
    )
    hard_negatives: bool = option(
        False,
        "build each batch from neighbours in the base model's embedding space (pairs the model confuses) "
        "instead of at random",
    )
    shuffle_buffer: int = option(
        1000, "streamed data (tar shards, parquet): pairs held in memory and drawn from at random", request=False
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
        _check(self.loss in LOSSES, f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        _check(
            isinstance(self.hard_negatives, bool), f"hard_negatives must be true or false, got {self.hard_negatives!r}"
        )
        _check(
            isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 1,
            f"shuffle_buffer must be an integer >= 1, got {self.shuffle_buffer!r}",
        )
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


@config_dataclass
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


GATE_METRICS = ("mean_r5",) + METRIC_NAMES  # mean_r5: the mean of t2i_r5 and i2t_r5


@config_dataclass
class GateConfig:
    """When a finished run goes live: the evaluation gate between a tuned candidate and the version serving now.

    The candidate and the serving version are measured on the run's held-out split in the same run (and on each
    regression set given); :func:`cliptuner.model.gate.decide` applies these options to the numbers.
    """

    gate: bool = option(
        True,
        "make the tuned model CURRENT only if it beats the version serving now on the held-out split (and loses at "
        "most max_regression on each regression set); otherwise it stays a listed candidate. false: every finished "
        "run goes live",
    )
    min_gain: float = option(
        0.0,
        "how much the candidate must beat the serving version by on gate_metric (absolute, e.g. 0.01 = one point); "
        "0: any gain, a tie is not enough; negative: a loss this small is accepted",
    )
    max_regression: float = option(
        0.01, "the most the candidate may lose against the serving version on a regression set (absolute)"
    )
    gate_metric: str = option(
        "mean_r5", "what the gate compares: mean_r5 (mean of t2i and i2t recall@5) or one recall", choices=GATE_METRICS
    )
    gate_wiseft: bool = option(
        False,
        "when the tuned weights lose too much on a regression set, try WiSE-FT blends of the serving and the tuned "
        "weights (wiseft_alphas, or 0.2 0.4 0.6 0.8) and promote the best blend that passes",
    )

    def __post_init__(self) -> None:
        _check(isinstance(self.gate, bool), f"gate must be true or false, got {self.gate!r}")
        _check(-1.0 <= self.min_gain <= 1.0, f"min_gain must be in [-1, 1], got {self.min_gain!r}")
        _check(0.0 <= self.max_regression <= 1.0, f"max_regression must be in [0, 1], got {self.max_regression!r}")
        _check(
            self.gate_metric in GATE_METRICS,
            f"gate_metric must be one of {list(GATE_METRICS)}, got {self.gate_metric!r}",
        )
        _check(isinstance(self.gate_wiseft, bool), f"gate_wiseft must be true or false, got {self.gate_wiseft!r}")


# -- /train parameters -----------------------------------------------------------------------------------------------
SOURCE_PARAMETERS = {  # /train parameters that name a file under the tuner's data root
    "data": "a PAIRS file (CSV or Karpathy JSON) under the data root to train on, instead of the request's docs",
    "eval_data": "a PAIRS file under the data root held out for before/after recall (default: a seeded "
    "eval_fraction of the training images)",
    "general_data": "a PAIRS file under the data root of general (not tuned-for) pairs, evaluated in the WiSE-FT sweep",
    "config": "a YAML or JSON file under the data root holding option values; the request's own parameters override it",
}
WAIT_HELP = "answer when the tuned version serves (the report), or at once with a run id to follow in /status"
REQUEST_ID_HELP = (
    "names the request: sent again, it follows the run it started instead of training twice (unset: derived from "
    "the request)"
)
TRAIN_SOURCES = ("request", "feedback")  # what a /train trains on: its docs or data file, or the recorded feedback
SOURCE_HELP = (
    "request: the request's docs or parameters['data']; feedback: the search feedback recorded by /feedback (its "
    "newest queries held out), mixed with parameters['data'] when given"
)
RUN_PARAMETERS = ("wait", "request_id")  # how a /train waits, and which request it is
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"  # a client's request_id


def _parameter(cls: type, f: dataclasses.Field) -> tuple[Any, Any]:
    """The (annotation, pydantic Field) of option ``f`` of ``cls`` as a request parameter."""
    extra = {"enum": list(f.metadata[CHOICES])} if CHOICES in f.metadata else None
    default = default_of(f)
    if isinstance(default, tuple):
        default = list(default)
    hint = typing.get_type_hints(cls)[f.name]
    return hint, pydantic.Field(default, description=f.metadata[HELP], json_schema_extra=extra)


@dataclasses.dataclass
class _Sources:
    """The annotations of the parameters that are not options: where the pairs come from, and ``wait``."""

    data: Optional[str] = None
    eval_data: Optional[str] = None
    general_data: Optional[str] = None
    config: Optional[str] = None
    source: str = "request"
    wait: bool = True
    request_id: Optional[str] = None


def _owner(name: str) -> type:
    """The class whose field a /train parameter is (for its cast)."""
    if name in request_names(EvalConfig):
        return EvalConfig
    if name in request_names(GateConfig):
        return GateConfig
    if name in SOURCE_PARAMETERS or name in RUN_PARAMETERS or name == "source":
        return _Sources
    return TrainConfig


def _cast_parameter(cls: type, value: Any, info: pydantic.ValidationInfo) -> Any:
    return cast_value(_owner(info.field_name), info.field_name, value)


def _train_parameters_model() -> type[pydantic.BaseModel]:
    fields: dict[str, Any] = {}
    for cls in (TrainConfig, EvalConfig, GateConfig):
        names = request_names(cls)
        fields.update({f.name: _parameter(cls, f) for f in dataclasses.fields(cls) if f.name in names})
    for name, text in SOURCE_PARAMETERS.items():
        fields[name] = (Optional[str], pydantic.Field(None, description=text))
    fields["source"] = (typing.Literal[TRAIN_SOURCES], pydantic.Field("request", description=SOURCE_HELP))
    fields["wait"] = (bool, pydantic.Field(True, description=WAIT_HELP))
    fields["request_id"] = (
        Optional[str],
        pydantic.Field(None, description=REQUEST_ID_HELP, pattern=REQUEST_ID_PATTERN),
    )
    return pydantic.create_model(
        "TrainParameters",
        __config__=pydantic.ConfigDict(extra="forbid"),
        __doc__="The parameters of a /train request (numbers may arrive as floats: 5.0 is taken as 5).",
        __validators__={"cast": pydantic.field_validator("*", mode="before")(classmethod(_cast_parameter))},
        **fields,
    )


TrainParameters = _train_parameters_model()  # the /train parameters: TrainConfig and EvalConfig options, sources, wait


def parse_train_parameters(values: Mapping[str, Any]) -> pydantic.BaseModel:
    """``/train``'s parameters, typed: numbers cast as :func:`from_mapping` casts them, unknown names refused.

    Ranges and combinations are checked when the configs are built from them (:class:`TrainConfig`,
    :class:`EvalConfig`).

    Raises:
        ValueError: an unknown parameter (named, with the allowed ones) or a value of the wrong type (named).
    """
    allowed = sorted(TrainParameters.model_fields)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for /train; allowed: {allowed}")
    try:
        return TrainParameters.model_validate(dict(values))
    except pydantic.ValidationError as exc:
        raise ValueError(validation_message(exc, TrainConfig)) from None


def train_parameters_schema() -> dict[str, Any]:
    """The JSON Schema of ``/train``'s parameters (docs/train-parameters.schema.json)."""
    schema = TrainParameters.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cliptuner.config --train-schema``: print the JSON Schema of ``/train``'s parameters."""
    parser = argparse.ArgumentParser(prog="python -m cliptuner.config", description=main.__doc__)
    parser.add_argument("--train-schema", action="store_true", help="print the JSON Schema of /train's parameters")
    args = parser.parse_args(argv)
    if not args.train_schema:
        parser.error("nothing to do: pass --train-schema")
    sys.stdout.write(json.dumps(train_parameters_schema(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
