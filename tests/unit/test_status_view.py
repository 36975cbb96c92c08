"""/status without server paths or pids for callers below admin (cliptuner/serve/status.py)."""

from cliptuner.serve.status import SERVER_PATH, status_view, wants_detail


def test_the_view_hides_pids_and_server_paths(tmp_path):
    workspace = tmp_path / "ws"
    state = {
        "executor": "CLIPTuner",
        "pid": 4242,
        "data_root": str(workspace / "data"),
        "registry": str(workspace),
        "elsewhere": "/etc/cliptuner/keys.json",
        "last_error": f"cannot read {workspace}/models/v3/model.json",
        "training": {"run_id": "r1", "pids": [1, 2], "out": str(workspace / "runs" / "r1")},
        "count": 10,
        "note": "a text with / in it",
    }
    view = status_view(state, workspace)
    assert "pid" not in view and "pids" not in view["training"]
    assert view["data_root"] == "data" and view["registry"] == "." and view["training"]["out"] == "runs/r1"
    assert view["elsewhere"] == SERVER_PATH
    assert view["last_error"] == "cannot read <workspace>/models/v3/model.json"
    assert str(tmp_path) not in repr(view)
    assert view["count"] == 10 and view["note"] == "a text with / in it"
    assert state["pid"] == 4242  # the state itself is unchanged


def test_only_a_true_detail_parameter_asks_for_detail():
    assert wants_detail({"detail": True})
    assert not wants_detail({"detail": "true"}) and not wants_detail({}) and not wants_detail(None)
