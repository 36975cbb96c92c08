"""Training options are declared once on the config dataclasses; the CLI flags, the /train parameters and the
config files derive from them. Every test walks ``dataclasses.fields``, so a new field cannot be forgotten."""

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from cliptuner import cli
from cliptuner.config import (
    SOURCE_PARAMETERS,
    EvalConfig,
    GateConfig,
    TrainConfig,
    from_mapping,
    parse_train_parameters,
    train_parameters_schema,
)
from cliptuner.config import main as config_main
from cliptuner.model.registry import Registry
from cliptuner.options import (
    CHOICES,
    add_arguments,
    cli_names,
    default_of,
    flags_of,
    given_options,
    kind_of,
    option,
    read_options_file,
    request_names,
)

# set by the service (device, threads, host memory), not by a client
NOT_REQUESTED = {"device", "num_workers", "log_every", "shuffle_buffer"}
NOT_FLAGS = {"device", "log_every"}  # --device is written by hand (cuda by default); the progress bar sets log_every
NEEDS = {"image_unlocked_groups": {"lock_image": True}, "text_unlocked_layers": {"lock_text": True}}
REQUIRED = ["train", "--data", "pairs.csv", "--out", "model"]


def other_value(cls, f: dataclasses.Field):
    """A valid value of ``f`` that is not its default."""
    kind, default = kind_of(cls, f.name), default_of(f)
    if CHOICES in f.metadata:
        return next(choice for choice in f.metadata[CHOICES] if choice != default)
    if kind.base is bool:
        return not default
    if kind.sequence:
        return (0.25, 0.75) if kind.base is float else (2, 3)
    if kind.base is int:
        return 3 if default is None else default + 2
    if kind.base is float:
        return 0.5 if default is None else default / 2
    raise AssertionError(f"no sample value for {f.name}")


def command_line(f: dataclasses.Field, value) -> list[str]:
    flag = flags_of(f)[0]
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, tuple):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args([*REQUIRED, *argv])


def train_subparser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def user_fields():
    return [(TrainConfig, f) for f in dataclasses.fields(TrainConfig)] + [
        (EvalConfig, f) for f in dataclasses.fields(EvalConfig) if f.name == "eval_fraction"
    ]


def field_of(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name)


def expected_configs(values: dict, **fixed) -> tuple[TrainConfig, EvalConfig]:
    """The configs that ``values`` (one option and what it needs) should give, all else at its default."""
    for name in list(values):
        values = {**values, **NEEDS.get(name, {})}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k != "eval_fraction"}, **fixed)
    eval_fraction = values.get("eval_fraction", EvalConfig().eval_fraction)
    return cfg, EvalConfig(eval_fraction=eval_fraction, split_seed=cfg.seed)


# -- declarations --------------------------------------------------------------------------------------------------
def test_every_training_field_is_declared_with_help_and_its_reach():
    for cls, f in user_fields():
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help text"
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert train_fields - set(request_names(TrainConfig)) == NOT_REQUESTED
    assert train_fields - set(cli_names(TrainConfig)) == NOT_FLAGS
    assert request_names(EvalConfig) == cli_names(EvalConfig) == ("eval_fraction",)


def test_weight_decay_help_states_the_openclip_rule():
    text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "weight_decay").metadata["help"]
    assert "embeddings included" in text and "biases" in text and "logit scale" in text


# -- command line --------------------------------------------------------------------------------------------------
def test_every_flag_parses_back_to_the_field_default():
    cfg, eval_cfg = cli._train_configs(parse("--device", "cpu"))
    assert cfg == TrainConfig(device="cpu")
    assert eval_cfg == EvalConfig(split_seed=0) and eval_cfg.eval_fraction == EvalConfig().eval_fraction
    assert given_options(parse(), TrainConfig) == {}  # nothing typed, nothing given


@pytest.mark.parametrize(
    "cls, f", [(c, f) for c, f in user_fields() if f.name in cli_names(c)], ids=lambda x: getattr(x, "name", "")
)
def test_every_flag_reaches_its_field_and_only_it(cls, f):
    value = other_value(cls, f)
    argv = ["--device", "cpu", *command_line(f, value)]
    for name, needed in NEEDS.get(f.name, {}).items():
        argv += command_line(field_of(name), needed)
    assert cli._train_configs(parse(*argv)) == expected_configs({f.name: value}, device="cpu")


def test_flag_names_stay_as_documented():
    args = parse(
        "--lr",
        "3e-4",
        "--workers",
        "2",
        "--batch-size",
        "8",
        "--eval-fraction",
        "0.25",
        "--grad-clip-norm",
        "none",
        "--early-stop-patience",
        "none",
        "--wiseft-alphas",
        "0",
        "1",
    )
    assert given_options(args, TrainConfig) == {
        "learning_rate": 3e-4,
        "num_workers": 2,
        "batch_size": 8,
        "grad_clip_norm": None,
        "early_stop_patience": None,
        "wiseft_alphas": [0.0, 1.0],
    }
    assert given_options(parse("--learning-rate", "1e-3", "--num-workers", "1"), TrainConfig) == {
        "learning_rate": 1e-3,
        "num_workers": 1,
    }
    with pytest.raises(SystemExit):
        parse("--log-every", "1")


def test_adam_betas_and_eps_reach_the_config_from_the_command_line():
    cfg, _ = cli._train_configs(parse("--device", "cpu", "--beta1", "0.8", "--beta2", "0.95", "--eps", "1e-8"))
    assert (cfg.beta1, cfg.beta2, cfg.eps) == (0.8, 0.95, 1e-8)


def test_help_shows_every_option_with_help_and_default(capsys):
    parser = train_subparser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and ("default:" in action.help or "required" in action.help), action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for cls, f in user_fields():
        if f.name in cli_names(cls):
            assert all(flag in text for flag in flags_of(f)), f.name
            assert f"{f.metadata['help']} (default: " in text, f.name
    assert "--config FILE" in text and "--device" in text


def test_a_bool_field_that_defaults_on_gets_a_no_flag():
    @dataclass
    class Toy:
        switch: bool = option(True, "a switch")
        count: Optional[int] = option(None, "how many")
        sizes: Sequence[int] = option((1, 2), "some sizes")
        hidden: int = option(0, "not a flag", cli=False)
        internal: int = 0

    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy)
    assert given_options(parser.parse_args([]), Toy) == {}
    assert given_options(parser.parse_args(["--no-switch", "--count", "3", "--sizes", "4", "5"]), Toy) == {
        "switch": False,
        "count": 3,
        "sizes": [4, 5],
    }
    assert given_options(parser.parse_args(["--switch", "--count", "None"]), Toy) == {"switch": True, "count": None}
    assert "(default: on)" in parser.format_help()
    for argv in (["--hidden", "1"], ["--internal", "1"], ["--count", "many"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)

    @dataclass
    class NoForm:
        table: dict = option(None, "a mapping")

    with pytest.raises(TypeError, match="NoForm.table"):
        add_arguments(argparse.ArgumentParser(), NoForm)


# -- config files --------------------------------------------------------------------------------------------------
def test_config_file_values_apply_and_flags_override_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "epochs: 3\nlearning_rate: 1e-5\nbeta2: 0.95\neps: 1.0e-8\nlock_image: true\n"
        "image_unlocked_groups: 1\neval_fraction: 0.3\nwiseft_alphas: [0.5, 1]\nseed: 4\n"
    )
    cfg, eval_cfg = cli._train_configs(
        parse("--config", str(path), "--device", "cpu", "--epochs", "5", "--beta2", "0.9")
    )
    assert cfg.epochs == 5  # a flag wins even when it repeats the default
    assert cfg.beta2 == 0.9
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)  # YAML 1.1 would read a string
    assert (cfg.eps, cfg.lock_image, cfg.image_unlocked_groups, cfg.wiseft_alphas) == (1e-8, True, 1, (0.5, 1.0))
    assert (eval_cfg.eval_fraction, eval_cfg.split_seed, cfg.seed) == (0.3, 4, 4)
    assert cfg.batch_size == TrainConfig().batch_size  # neither in the file nor given

    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"epochs": 2, "device": "cpu", "num_workers": 1}))
    cfg, _ = cli._train_configs(parse("--config", str(json_path)))
    assert (cfg.epochs, cfg.device, cfg.num_workers) == (2, "cpu", 1)


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ("epochz: 3\nlearning_rate: 1e-4\n", ".yaml", r"unknown option\(s\) \['epochz'\] in config file"),
        ("log_every: 1\n", ".yml", r"unknown option\(s\) \['log_every'\]"),
        ("- 1\n- 2\n", ".yaml", "must hold a mapping of option names"),
        ("epochs: [1\n", ".yaml", "is not valid YAML"),
        ('{"epochs": 2,}', ".json", "is not valid JSON"),
        ("epochs = 2\n", ".toml", "must be YAML or JSON"),
        ("learning_rate: fast\n", ".yaml", "learning_rate must be a number, got 'fast'"),
        ("lock_text: 1\n", ".yaml", "lock_text must be true or false"),
    ],
)
def test_bad_config_files_are_named(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        cli._train_configs(parse("--config", str(path), "--device", "cpu"))
    assert cli.main([*REQUIRED, "--config", str(path), "--device", "cpu", "--quiet"]) == 2
    assert re.search("cliptuner train: error: .*" + message, capsys.readouterr().err)


def test_read_options_file_names_the_file_by_its_label(tmp_path):
    path = tmp_path / "secret" / "opts.yaml"
    path.parent.mkdir()
    path.write_text("device: cuda\n")
    with pytest.raises(ValueError) as error:
        read_options_file(path, request_names(TrainConfig), label="opts.yaml")
    assert "'opts.yaml'" in str(error.value) and "secret" not in str(error.value) and "device" in str(error.value)
    path.write_text("")
    assert read_options_file(path, ["epochs"]) == {}


def test_from_mapping_casts_and_names_wrong_types():
    cfg = from_mapping(TrainConfig, {"epochs": 3.0, "wiseft_alphas": [0, 1], "grad_clip_norm": None})
    assert cfg.epochs == 3 and cfg.wiseft_alphas == (0.0, 1.0) and cfg.grad_clip_norm is None
    for values, message in [
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"lock_image": 1}, "lock_image must be true or false"),
        ({"wiseft_alphas": "0.5"}, "wiseft_alphas must be a list of numbers"),
        ({"wiseft_alphas": [0.5, "x"]}, "wiseft_alphas must be a list of numbers"),
        ({"epochs": None}, "epochs must be an integer, got None"),
        ({"seed": True}, "seed must be an integer"),
        ({"eps": 0.0}, "eps must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            from_mapping(TrainConfig, values)


# -- /train --------------------------------------------------------------------------------------------------------
@pytest.fixture
def tuner(tmp_path, tiny_model_dir):
    from executors import CLIPTuner

    Registry(tmp_path / "models").publish(tiny_model_dir)
    t = CLIPTuner(workspace=str(tmp_path), bootstrap=False, device="cpu")
    yield t
    t.close()


def as_request(value):
    """As a protobuf Struct delivers it: every number a float."""
    if isinstance(value, tuple):
        return [as_request(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def test_train_accepts_every_request_field_and_refuses_the_others(tuner):
    from executors.tuner import TRAIN_OPTIONS

    assert set(TRAIN_OPTIONS) == set(request_names(TrainConfig))
    defaults = {f.name: as_request(default_of(f)) for f in dataclasses.fields(TrainConfig) if f.name in TRAIN_OPTIONS}
    request = tuner.parse_request(defaults)
    assert request.cfg == TrainConfig(device="cpu", log_every=1)
    assert request.eval_cfg == EvalConfig()
    for name in sorted(NOT_REQUESTED):
        with pytest.raises(ValueError, match=rf"unknown parameter\(s\) \['{name}'\] for /train"):
            tuner.parse_request({name: 1.0})


@pytest.mark.parametrize(
    "cls, f", [(c, f) for c, f in user_fields() if f.name in request_names(c)], ids=lambda x: getattr(x, "name", "")
)
def test_every_request_parameter_reaches_its_field_and_only_it(tuner, cls, f):
    value = other_value(cls, f)
    request = tuner.parse_request({f.name: as_request(value), **NEEDS.get(f.name, {})})
    assert (request.cfg, request.eval_cfg) == expected_configs({f.name: value}, device="cpu", log_every=1)


def test_adam_betas_and_eps_reach_the_config_from_a_request(tuner):
    cfg = tuner.parse_request({"beta1": 0.8, "beta2": 0.95, "eps": 1e-8}).cfg
    assert (cfg.beta1, cfg.beta2, cfg.eps) == (0.8, 0.95, 1e-8)


def test_train_config_file_under_the_data_root_with_parameters_over_it(tuner, tmp_path):
    (tmp_path / "data" / "opts.yaml").write_text("epochs: 3\nbeta1: 0.8\neval_fraction: 0.3\nseed: 2\n")
    request = tuner.parse_request({"config": "opts.yaml", "epochs": 4.0})
    assert (request.cfg.epochs, request.cfg.beta1, request.cfg.seed) == (4, 0.8, 2)
    assert (request.eval_cfg.eval_fraction, request.eval_cfg.split_seed) == (0.3, 2)
    (tmp_path / "data" / "bad.json").write_text(json.dumps({"epochs": 2, "device": "cuda"}))
    with pytest.raises(ValueError) as error:
        tuner.parse_request({"config": "bad.json"})
    assert "['device'] in config file 'bad.json'" in str(error.value) and str(tmp_path) not in str(error.value)
    (tmp_path / "outside.yaml").write_text("epochs: 2\n")
    with pytest.raises(ValueError, match="parameter 'config': '../outside.yaml' is outside the data root"):
        tuner.parse_request({"config": "../outside.yaml"})


# -- pydantic: as strict as the casts, plain errors, the JSON Schema of /train --------------------------------------
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "train-parameters.schema.json"


def test_configs_built_directly_are_as_strict_as_the_casts():
    assert TrainConfig(epochs=np.int64(3), learning_rate=1).learning_rate == 1.0  # numpy ints, ints for floats
    for kwargs, message in [
        ({"epochs": True}, "epochs must be an integer, got True"),
        ({"epochs": 2.5}, "epochs must be a whole number, got 2.5"),
        ({"epochs": "3"}, "epochs must be an integer, got '3'"),
        ({"lock_text": 1}, "lock_text must be true or false, got 1"),
        ({"scheduler": "linear"}, r"scheduler must be one of \['cosine', 'constant'\], got 'linear'"),
        ({"epochz": 3}, r"unknown TrainConfig option\(s\) \['epochz'\]; known: \['accum_steps'"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            TrainConfig(**kwargs)
        assert type(error.value) is ValueError and "\n" not in str(error.value)  # one line, not pydantic's report
    with pytest.raises(ValueError, match="ks must be a list of integers"):
        EvalConfig(ks=[1, True])
    assert TrainConfig(epochs=5.0).epochs == 5 and isinstance(TrainConfig(epochs=5.0).epochs, int)


def test_every_bad_value_of_a_config_is_named_at_once():
    with pytest.raises(ValueError) as error:
        TrainConfig(epochs=True, batch_size="many")
    assert "epochs must be an integer, got True" in str(error.value)
    assert "batch_size must be an integer, got 'many'" in str(error.value)


def test_configs_stay_dataclasses():
    cfg = dataclasses.replace(TrainConfig(), epochs=2, wiseft_alphas=[0, 1])
    assert (cfg.epochs, cfg.wiseft_alphas) == (2, (0.0, 1.0))
    assert dataclasses.asdict(cfg)["epochs"] == 2 and dataclasses.is_dataclass(EvalConfig)
    with pytest.raises(ValueError, match="epochs must be an integer"):
        dataclasses.replace(cfg, epochs=False)


def test_train_parameters_are_typed_like_the_configs():
    params = parse_train_parameters({"epochs": 3.0, "learning_rate": 1, "wiseft_alphas": [0, 1], "data": "p.csv"})
    assert (params.epochs, params.learning_rate, tuple(params.wiseft_alphas), params.data) == (
        3,
        1.0,
        (0.0, 1.0),
        "p.csv",
    )
    assert params.wait is True and params.eval_fraction == EvalConfig().eval_fraction
    for values, message in [
        ({"epochs": True}, "epochs must be an integer, got True"),
        ({"epochs": 5.5}, "epochs must be a whole number, got 5.5"),
        ({"wait": 1.0}, "wait must be true or false, got 1.0"),
        ({"data": 3.0}, "data must be a string or null, got 3.0"),
        ({"device": "cuda"}, r"unknown parameter\(s\) \['device'\] for /train; allowed: \['accum_steps'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_train_parameters(values)


def test_the_train_schema_names_every_parameter_with_its_type_default_and_help():
    schema = train_parameters_schema()
    properties = schema["properties"]
    expected = {
        *request_names(TrainConfig),
        *request_names(EvalConfig),
        *request_names(GateConfig),
        *SOURCE_PARAMETERS,
        "source",
        "wait",
        "request_id",
    }
    assert set(properties) == expected and schema["additionalProperties"] is False
    assert properties["epochs"]["type"] == "integer" and properties["epochs"]["default"] == 5
    assert properties["learning_rate"]["type"] == "number"
    assert properties["scheduler"]["enum"] == ["cosine", "constant"]
    assert properties["export_precision"]["enum"] == ["fp32", "fp16", "int8"]
    assert {"type": "null"} in properties["grad_clip_norm"]["anyOf"]
    assert properties["wiseft_alphas"] == {**properties["wiseft_alphas"], "type": "array", "default": []}
    assert properties["gate"]["default"] is True and properties["max_regression"]["default"] == 0.01
    assert properties["gate_metric"]["enum"][0] == "mean_r5" and properties["gate_metric"]["default"] == "mean_r5"
    for name, f in [(f.name, f) for f in dataclasses.fields(TrainConfig) if f.name in request_names(TrainConfig)]:
        assert properties[name]["description"] == f.metadata["help"], name
    assert all(properties[name]["description"] for name in expected)


def test_the_committed_train_schema_is_what_the_code_gives(capsys):
    assert json.loads(SCHEMA_FILE.read_text()) == train_parameters_schema(), (
        "docs/train-parameters.schema.json is stale: python -m cliptuner.config --train-schema "
        "> docs/train-parameters.schema.json"
    )
    assert config_main(["--train-schema"]) == 0
    assert capsys.readouterr().out == SCHEMA_FILE.read_text()
