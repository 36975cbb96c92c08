"""``cliptuner models list|promote|rollback|prune`` on a temp registry of fake model versions."""

import json

import pytest
from fake_models import REPORT, make_model_dir, publish_fake

from cliptuner.cli import main
from cliptuner.model.registry import Registry


@pytest.fixture
def workspace(tmp_path):
    """``<tmp>/ws/models`` with v1 (base), v2 (tuned from v1, with a report), v3 (tuned from v2) CURRENT."""
    reg = Registry(tmp_path / "ws" / "models")
    publish_fake(reg, tmp_path, "v1", arch="base-arch")
    publish_fake(reg, tmp_path, "v2", parent="v1", report=REPORT)
    publish_fake(reg, tmp_path, "v3", parent="v2")
    return tmp_path / "ws"


def models(*args: str) -> int:
    return main(["models", *args])


def test_list_prints_a_table_with_current_lineage_and_recall(workspace, capsys):
    assert models("list", "--workspace", str(workspace)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "VERSION",
        "STATUS",
        "CREATED",
        "PARENT",
        "ARCH",
        "EPOCHS",
        "T2I",
        "R@5",
        "%",
        "I2T",
        "R@5",
        "%",
        "MEAN",
        "RECALL",
        "%",
    ]
    rows = {line.split()[0] if not line.startswith("*") else line.split()[1]: line for line in lines[1:]}
    assert sorted(rows) == ["v1", "v2", "v3"]
    assert rows["v1"].split()[:6] == ["v1", "published", "2024-01-01", "10:00:00", "-", "base-arch"]
    assert rows["v2"].split() == [
        "v2",
        "published",
        "2024-01-02",
        "10:00:00",
        "v1",
        "fake",
        "3",
        "25.0",
        "->",
        "50.0",
        "30.0",
        "->",
        "55.0",
        "30.0",
        "->",
        "52.0",
    ]
    assert rows["v3"].startswith("*") and rows["v3"].split()[1:6] == ["v3", "current", "2024-01-03", "10:00:00", "v2"]


def test_list_json_and_models_dir(workspace, capsys):
    assert models("list", "--models-dir", str(workspace / "models"), "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["version"] for entry in listed] == ["v1", "v2", "v3"]
    assert listed[1]["report"]["after"]["t2i_r5"] == 0.5 and listed[2]["current"] is True


def test_list_shows_a_broken_version_with_its_error(workspace, capsys):
    (workspace / "models" / "v2" / "model.json").write_text("{broken")
    assert models("list", "--workspace", str(workspace)) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    v2 = next(i for i, line in enumerate(lines) if line.split()[:1] == ["v2"])
    assert lines[v2 + 1].strip().startswith("error: cannot read") and "v2" in lines[v2 + 1]


def test_promote_then_rollback_move_current(workspace, capsys):
    reg = Registry(workspace / "models")
    assert models("promote", "v1", "--workspace", str(workspace)) == 0
    assert reg.current() == "v1" and "CURRENT is now v1 (was v3)" in capsys.readouterr().out
    assert models("promote", "v3", "--workspace", str(workspace)) == 0
    assert models("rollback", "--workspace", str(workspace)) == 0
    assert reg.current() == "v2" and "CURRENT is now v2 (was v3)" in capsys.readouterr().out
    assert models("rollback", "--workspace", str(workspace)) == 0
    assert reg.current() == "v1"
    assert models("rollback", "--workspace", str(workspace)) == 2
    assert "cannot roll back from model version 'v1'" in capsys.readouterr().err
    assert reg.current() == "v1"


def test_promote_refuses_unknown_and_broken_versions(workspace, capsys):
    assert models("promote", "v7", "--workspace", str(workspace)) == 2
    err = capsys.readouterr().err
    assert err.startswith("cliptuner models: error: unknown model version 'v7'") and "['v1', 'v2', 'v3']" in err
    (workspace / "models" / "v1" / "visual.onnx").unlink()
    assert models("promote", "v1", "--workspace", str(workspace)) == 2
    assert "model version 'v1' cannot be served" in capsys.readouterr().err
    assert Registry(workspace / "models").current() == "v3"


def test_prune_keeps_the_newest_and_current(workspace, capsys):
    reg = Registry(workspace / "models")
    reg.set_current("v1")
    assert models("prune", "--keep", "1", "--workspace", str(workspace)) == 0
    assert "deleted v2; kept v1, v3" in capsys.readouterr().out
    assert reg.versions() == ["v1", "v3"]
    assert models("prune", "--keep", "0", "--workspace", str(workspace)) == 2
    assert "keep must be an integer >= 1, got 0" in capsys.readouterr().err
    assert models("prune", "--keep", "5", "--workspace", str(workspace)) == 0
    assert "nothing to delete" in capsys.readouterr().out and reg.versions() == ["v1", "v3"]


def test_a_missing_registry_is_an_error_not_a_new_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CLIPTUNER_WORKSPACE", raising=False)
    assert models("list", "--workspace", str(tmp_path / "nowhere")) == 2
    assert "no model registry at" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    assert models("list") == 2
    assert "pass --workspace DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one of the two, not both
        models("list", "--workspace", str(tmp_path), "--models-dir", str(tmp_path))


def test_workspace_from_the_environment(workspace, capsys, monkeypatch):
    monkeypatch.setenv("CLIPTUNER_WORKSPACE", str(workspace))
    assert models("list", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_help_names_every_action_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for action in ("list", "publish", "promote", "rollback", "prune"):
        assert f"cliptuner models {action}" in out


def test_publish_adds_the_next_version_and_makes_it_current(workspace, tmp_path, capsys):
    src = make_model_dir(tmp_path / "trained")
    assert models("publish", str(src), "--workspace", str(workspace)) == 0
    assert capsys.readouterr().out.strip() == "published v4; CURRENT is now v4"
    reg = Registry(workspace / "models")
    assert reg.versions() == ["v1", "v2", "v3", "v4"] and reg.current() == "v4"
    assert src.is_dir()  # copied, not moved
    assert (
        models("publish", str(src), "--workspace", str(workspace), "--model-version", "candidate", "--no-current") == 0
    )
    assert capsys.readouterr().out.strip() == "published candidate"
    assert "candidate" in reg.versions() and reg.current() == "v4"


def test_publish_creates_a_registry_and_refuses_what_is_not_a_model(tmp_path, capsys):
    src = make_model_dir(tmp_path / "trained")
    assert models("publish", str(src), "--workspace", str(tmp_path / "fresh")) == 0
    assert Registry(tmp_path / "fresh" / "models").current() == "v1"
    capsys.readouterr()
    assert models("publish", str(tmp_path), "--workspace", str(tmp_path / "fresh")) == 2  # no model.json there
    err = capsys.readouterr().err
    assert err.startswith("cliptuner models: error:") and "model.json" in err
    assert models("publish", str(src), "--workspace", str(tmp_path / "fresh"), "--model-version", "v1") == 2
    assert "v1" in capsys.readouterr().err
    assert Registry(tmp_path / "fresh" / "models").versions() == ["v1"]
