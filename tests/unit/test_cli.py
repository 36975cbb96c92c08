"""The ``cliptuner`` command end to end on small synthetic files: train → eval → export → encode."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cliptuner.cli import main
from cliptuner.train import synthetic
from cliptuner.train.evaluate import METRIC_KEYS
from cliptuner.train.plots import is_drawn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    csv = synthetic.write_csv(root / "data", n_images=60, domain="domain", seed=5, captions_per_image=2)
    out = root / "model-a"
    code = main(
        [
            "train",
            "--data",
            str(csv),
            "--model",
            "cliptuner-tiny",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--lr",
            "5e-4",
            "--warmup-steps",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return csv, out


def test_train_writes_a_model_version_and_report(trained):
    _, out = trained
    for name in ("visual.onnx", "textual.onnx", "model.json", "checkpoint.pt", "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["model_version"] == "model-a"
    assert set(METRIC_KEYS) <= set(report["before"]) and set(METRIC_KEYS) <= set(report["after"])
    assert report["epochs"] == 2 and len(report["epoch_losses"]) == 2
    assert report["samples_per_s"] > 0
    assert report["split"]["eval_images"] == 12 and report["split"]["train_images"] == 48
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"] == "cliptuner-tiny" and meta["version"] == "model-a"
    for plot in ("training.png", "recall.png"):  # drawn from the report, beside it
        assert is_drawn(out / "plots" / plot), plot


def test_eval_of_exported_model_matches_the_training_report(trained, tmp_path, capsys):
    csv, out = trained
    # the held-out part of the CSV, as train split it: same seed, same fraction
    from cliptuner.train.data import load_csv

    _, held_out = load_csv(csv).split(0.2, 0)
    rows = ["image,caption"] + [
        f"{held_out.images[i]},{held_out.captions[p]}" for p, i in enumerate(held_out.image_index)
    ]
    (tmp_path / "held.csv").write_text("\n".join(rows) + "\n")
    assert (
        main(
            ["eval", "--data", str(tmp_path / "held.csv"), "--model-dir", str(out), "--json", str(tmp_path / "m.json")]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    report = json.loads((out / "report.json").read_text())
    for key in METRIC_KEYS:  # ONNX on the same split reproduces the torch evaluation
        assert metrics[key] == pytest.approx(report["after"][key], abs=1e-9), key
    assert "t2i_r5" in capsys.readouterr().out


def test_export_from_checkpoint_reproduces_the_embeddings(trained, tmp_path):
    _, out = trained
    assert main(["export", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "again")]) == 0
    texts = ["a large teal star on the left", "two small dotted brown hexagons"]
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["encode", "--model-dir", str(out), "--text", *texts, "--out", str(a)]) == 0
    assert main(["encode", "--model-dir", str(tmp_path / "again"), "--text", *texts, "--out", str(b)]) == 0
    ea, eb = np.load(a), np.load(b)
    assert ea.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(ea, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ea, eb, atol=1e-6)


def test_karpathy_json_trains_on_its_train_split(tmp_path):
    path = synthetic.write_karpathy(
        tmp_path / "k", n_images=40, domain="generic", seed=2, captions_per_image=2, test_fraction=0.25
    )
    out = tmp_path / "m"
    assert (
        main(
            [
                "train",
                "--data",
                str(path),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    split = json.loads((out / "report.json").read_text())["split"]
    assert split == {"train_images": 30, "train_pairs": 60, "eval_images": 10, "eval_pairs": 20}


def test_an_int8_export_reports_its_held_out_recall_beside_fp32(trained, tmp_path):
    csv, out = trained
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--out",
                str(tmp_path / "int8"),
                "--precision",
                "int8",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "int8" / "model.json").read_text())["precision"] == "int8"
    # /train and `cliptuner train` take it as export_precision: the report then holds both recalls
    data = synthetic.write_csv(tmp_path / "data", n_images=40, domain="domain", seed=6, captions_per_image=2)
    tuned = tmp_path / "tuned"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--out",
                str(tuned),
                "--quiet",
                "--device",
                "cpu",
                "--export-precision",
                "int8",
            ]
        )
        == 0
    )
    report = json.loads((tuned / "report.json").read_text())
    exported = report["exported"]
    assert exported["precision"] == "int8" and exported["measured"] is True
    for key in METRIC_KEYS:
        assert 0.0 <= exported["after"][key] <= 1.0
        assert exported["drop"][key] == pytest.approx(report["after"][key] - exported["after"][key], abs=1e-6)
    meta = json.loads((tuned / "model.json").read_text())
    assert meta["precision"] == "int8" and meta["report"]["exported"] == exported


def test_bad_rows_give_an_error_naming_the_row(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,a red circle\nmissing.png,a blue square\n")
    code = main(["train", "--data", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "line 3" in err and "missing.png" in err


def test_console_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "cliptuner.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in ("train", "eval", "export", "encode"):
        assert command in result.stdout


def test_help_is_plain_text_with_examples_and_every_option_explained(capsys):
    from cliptuner.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "examples:" in top and "cliptuner demo" in top
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"cliptuner {name} {action.option_strings[0]} has no help text"


def test_version_names_the_package_and_model_versions_have_their_own_flag(capsys):
    from importlib.metadata import version

    from cliptuner.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"cliptuner {version('cliptuner')}"
    args = build_parser().parse_args(["train", "--data", "p.csv", "--out", "o", "--model-version", "v7"])
    assert args.version == "v7"
    args = build_parser().parse_args(["export", "--checkpoint", "c.pt", "--out", "o", "--model-version", "v8"])
    assert args.version == "v8"


@pytest.mark.parametrize("command", [["encode", "--model-dir", "m"], ["eval", "--data", "p.csv", "--model-dir", "m"]])
def test_one_device_syntax_everywhere(command, capsys):
    from cliptuner.cli import build_parser

    parser = build_parser()
    for device in ("auto", "cpu", "cuda", "cuda:1"):  # what serve takes
        assert parser.parse_args(command + ["--device", device]).device == device
    with pytest.raises(SystemExit):
        parser.parse_args(command + ["--device", "gpu"])
    assert "device must be one of ['auto', 'cpu', 'cuda'] or 'cuda:N', got 'gpu'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--http-port", "0"], {}, "--http-port / CLIPTUNER_HTTP_PORT must be a port number in [1, 65535], got '0'"),
        (["--http-port", "51000", "--port", "51000"], {}, "must differ from the gRPC port, got 51000 for both"),
        ([], {"CLIPTUNER_HTTP_PORT": "abc"}, "must be a port number in [1, 65535], got 'abc'"),
    ],
)
def test_a_bad_http_port_is_refused_by_name_before_anything_starts(args, env, message, tmp_path, monkeypatch, capsys):
    from cliptuner.cli.serve import METRICS_PORTS, SERVE_ENV

    written = [*SERVE_ENV.values(), "CLIPTUNER_METRICS", *(f"CLIPTUNER_METRICS_PORT_{n}" for n in METRICS_PORTS)]
    for name in written:  # serve writes its settings into the environment: restored after the test
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--workspace", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "models").exists()  # nothing was started
