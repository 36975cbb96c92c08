"""The CLIPTUNER_* environment is read in one place (cliptuner/settings.py); the Executors share one settings model
and one set-up (executors/options.py); `cliptuner serve` adds metrics to a Flow that names only three variables."""

import re
from pathlib import Path

import pytest
import yaml

from cliptuner.model.registry import Registry
from cliptuner.serve.flows import flow_config
from cliptuner.settings import PREFIX, ServiceEnvironment
from executors.options import ExecutorSettings, ExecutorSetup

ROOT = Path(__file__).resolve().parents[2]
VARIABLE = re.compile(r"\bCLIPTUNER_[A-Z][A-Z_]*[A-Z]\b")


@pytest.fixture
def clean_env(monkeypatch):
    """This process's environment without any CLIPTUNER_* variable (restored after the test)."""
    import os

    for name in [n for n in os.environ if n.startswith(PREFIX)]:
        monkeypatch.delenv(name)
    return monkeypatch


# -- the one reader -------------------------------------------------------------------------------------------------
def test_every_variable_the_service_names_is_a_setting():
    fields = {ServiceEnvironment.variable_name(name) for name in ServiceEnvironment.model_fields}
    sources = [*ROOT.glob("cliptuner/**/*.py"), *ROOT.glob("executors/*.py"), *ROOT.glob("flows/*.yml")]
    named = {name for path in sources for name in VARIABLE.findall(path.read_text())}
    assert named - fields == set(), "a CLIPTUNER_* variable that cliptuner/settings.py does not declare"


def test_no_module_reads_a_cliptuner_variable_from_os_environ():
    read = re.compile(r"os\.environ(\.get\(|\[)\s*[\"']CLIPTUNER_|os\.getenv\(\s*[\"']CLIPTUNER_")
    sources = [*ROOT.glob("cliptuner/**/*.py"), *ROOT.glob("executors/*.py")]
    readers = [str(p.relative_to(ROOT)) for p in sources if read.search(p.read_text())]
    assert readers == []


def test_unset_and_empty_variables_take_the_defaults():
    environment = ServiceEnvironment.from_environ({"CLIPTUNER_PRETRAINED": "", "CLIPTUNER_DEVICE": "  "})
    assert environment == ServiceEnvironment()
    assert (environment.host, environment.port, environment.model, environment.device) == (
        "127.0.0.1",
        51000,
        "cliptuner-tiny",
        "auto",
    )
    assert environment.workspace is None and environment.metrics_ports() == {}
    assert not environment.is_set("device")


def test_set_variables_are_typed():
    environment = ServiceEnvironment.from_environ(
        {
            "CLIPTUNER_PORT": "52000",
            "CLIPTUNER_WORKSPACE": "/srv/ws",
            "CLIPTUNER_URI_ROOTS": "data:/mnt/images",
            "CLIPTUNER_ALLOWED_HOSTS": "images.example.com, 127.0.0.1:8080,",
            "CLIPTUNER_MILVUS_TOKEN": "user:secret",
            "CLIPTUNER_BATCH_WAIT_MS": "0",
            "CLIPTUNER_METRICS_PORT": "9100",
            "CLIPTUNER_TORCH_THREADS": "3",
        }
    )
    assert environment.port == 52000 and environment.workspace == Path("/srv/ws")
    assert environment.uri_roots == ("data", "/mnt/images")
    assert environment.allowed_hosts == ("images.example.com", "127.0.0.1:8080")
    assert environment.milvus_token.get_secret_value() == "user:secret" and "secret" not in repr(environment)
    assert environment.batch_wait_ms == 0.0 and environment.torch_threads == 3
    assert environment.metrics_ports() == {"gateway": 9100, "tuner": 9101, "encoder": 9102, "indexer": 9103}
    assert environment.is_set("port") and not environment.is_set("host")


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("CLIPTUNER_PORT", "fifty", "--port / CLIPTUNER_PORT must be a port number in [1, 65535], got 'fifty'"),
        ("CLIPTUNER_HTTP_PORT", "70000", "--http-port / CLIPTUNER_HTTP_PORT must be a port number in [1, 65535]"),
        ("CLIPTUNER_INDEX_SHARDS", "65", "--index-shards / CLIPTUNER_INDEX_SHARDS must be a whole number in [1, 64]"),
        ("CLIPTUNER_BATCH_WAIT_MS", "soon", "--batch-wait-ms / CLIPTUNER_BATCH_WAIT_MS must be a number in [0, 1000]"),
        ("CLIPTUNER_METRICS_PORT", "65534", "must be a port number that leaves room for 4 ports below 65536"),
        ("CLIPTUNER_TORCH_THREADS", "two", "CLIPTUNER_TORCH_THREADS must be an integer, got 'two'"),
    ],
)
def test_a_bad_variable_is_refused_by_name(variable, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServiceEnvironment.from_environ({variable: value})


def test_a_reader_parses_only_what_it_asks_for(clean_env, workspace):
    from cliptuner.cli import main

    environ = {"CLIPTUNER_HTTP_PORT": "0", "CLIPTUNER_WORKSPACE": "/srv/ws"}
    assert ServiceEnvironment.get("workspace", environ) == Path("/srv/ws")
    assert ServiceEnvironment.from_environ(environ, only=["workspace"]).http_port is None
    with pytest.raises(ValueError, match="CLIPTUNER_HTTP_PORT"):
        ServiceEnvironment.from_environ(environ)  # all of them: what `cliptuner serve` checks
    clean_env.setenv("CLIPTUNER_HTTP_PORT", "0")  # a bad variable `cliptuner models` does not use
    clean_env.setenv("CLIPTUNER_WORKSPACE", str(workspace))
    assert main(["models", "list", "--json"]) == 0


def test_the_environment_schema_lists_every_variable_with_its_help():
    schema = ServiceEnvironment.model_json_schema()
    assert set(schema["properties"]) == set(ServiceEnvironment.model_fields)
    assert all(prop.get("description") for prop in schema["properties"].values())


# -- the Executors' settings and set-up -----------------------------------------------------------------------------
def test_executor_settings_fill_unset_values_from_the_environment(clean_env):
    clean_env.setenv("CLIPTUNER_MODEL", "ViT-B-32")
    clean_env.setenv("CLIPTUNER_DEVICE", "cpu")
    settings = ExecutorSettings.of(model="${{ ENV.CLIPTUNER_MODEL }}", pretrained="", device=None, max_docs=8.0)
    assert (settings.model, settings.pretrained, settings.device, settings.max_docs) == ("ViT-B-32", None, "cpu", 8)
    assert ExecutorSettings.of(device="cuda").device == "cuda"  # a setting wins over the environment
    clean_env.delenv("CLIPTUNER_MODEL")
    assert ExecutorSettings.of().model == "cliptuner-tiny"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_docs": True}, "max_docs must be an integer, got True"),
        ({"max_docs": 0}, "max_docs must be a positive integer, got 0"),
        ({"max_text_chars": 2.5}, "max_text_chars must be a whole number, got 2.5"),
        ({"bootstrap": "no"}, "bootstrap must be true or false, got 'no'"),
        ({"bootstrap_timeout": -1}, "bootstrap_timeout must be >= 0 seconds, got -1.0"),
        ({"max_blob_bytes": 10, "max_request_bytes": 5}, r"max_blob_bytes \(10\) must not exceed max_request_bytes"),
        ({"max_dcos": 5}, r"unknown ExecutorSettings option\(s\) \['max_dcos'\]; known: \['allowed_hosts'"),
    ],
)
def test_bad_executor_settings_are_refused_by_name(clean_env, values, message):
    with pytest.raises(ValueError, match=message):
        ExecutorSettings.of(**values)


def test_the_set_up_gives_workspace_registry_policy_limits_and_bootstraps(clean_env, tmp_path, tiny_model_dir):
    class Plain:  # what the set-up reads of an Executor
        runtime_args = metas = None

    Registry(tmp_path / "models").publish(tiny_model_dir)
    (tmp_path / "data").mkdir()
    settings = ExecutorSettings.of(workspace=str(tmp_path), bootstrap=False, bootstrap_timeout=1, max_docs=7)
    setup = ExecutorSetup.start(Plain(), settings)
    assert setup.root == tmp_path.resolve() and setup.registry.root == tmp_path.resolve() / "models"
    assert setup.current == "v1" and setup.limits.max_docs == 7
    assert setup.policy.roots == (tmp_path.resolve() / "data",) and setup.policy.allowed_hosts == ()
    clean_env.setenv("CLIPTUNER_WORKSPACE", str(tmp_path))
    clean_env.setenv("CLIPTUNER_ALLOWED_HOSTS", "images.example.com")
    setup = ExecutorSetup.start(Plain(), ExecutorSettings.of(bootstrap=False, bootstrap_timeout=1))
    assert setup.root == tmp_path.resolve() and setup.policy.allowed_hosts == ("images.example.com",)
    clean_env.delenv("CLIPTUNER_WORKSPACE")
    with pytest.raises(ValueError, match="no workspace"):
        ExecutorSetup.start(Plain(), ExecutorSettings.of(bootstrap=False))


def test_the_encoder_takes_unset_settings_from_the_environment(clean_env, workspace):
    from executors import CLIPEncoder

    clean_env.setenv("CLIPTUNER_BATCH_WAIT_MS", "0")
    clean_env.setenv("CLIPTUNER_DEVICE", "cpu")
    encoder = CLIPEncoder(workspace=str(workspace), bootstrap=False, bootstrap_timeout=1, max_docs=3)
    try:
        assert encoder.batch_wait_ms == 0 and encoder.batcher is None and encoder.limits.max_docs == 3
        assert encoder.status()["providers"] == ["CPUExecutionProvider"]
    finally:
        encoder.close()
    with pytest.raises(ValueError, match="max_docs must be an integer, got True"):
        CLIPEncoder(workspace=str(workspace), bootstrap=False, max_docs=True)


# -- the Flow YAMLs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flow.yml", "shards.yml", "serving.yml"])
def test_the_flows_name_only_what_they_need(name):
    text = (ROOT / "flows" / name).read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    named = set(VARIABLE.findall(body))
    needed = {"CLIPTUNER_HOST", "CLIPTUNER_PORT", "CLIPTUNER_WORKSPACE"}
    assert needed <= named
    assert "monitoring" not in body  # metrics: `cliptuner serve --metrics-port`
    # what the tuner and the indexer still take from the Flow: settings that fall back to None when unset
    assert named - needed <= {
        "CLIPTUNER_DEVICE",
        "CLIPTUNER_INDEX_BACKEND",
        "CLIPTUNER_MILVUS_URI",
        "CLIPTUNER_INDEX_SHARDS",
    }
    encoder = next(e for e in yaml.safe_load(text)["executors"] if e["name"] == "encoder")
    assert not set(VARIABLE.findall(yaml.safe_dump(encoder.get("uses_with", {}))))


def test_serve_adds_metrics_to_a_flow_config():
    path = ROOT / "flows" / "flow.yml"
    plain = flow_config(path, {})
    assert "monitoring" not in plain["with"] and all("monitoring" not in e for e in plain["executors"])
    modules = {m for e in plain["executors"] for m in e["py_modules"]}
    assert modules == {str(ROOT / "executors" / "__init__.py")}
    ports = {"gateway": 9100, "tuner": 9101, "encoder": 9102, "indexer": 9103}
    config = flow_config(path, ports)
    assert (config["with"]["monitoring"], config["with"]["port_monitoring"]) == (True, 9100)
    assert {e["name"]: e["port_monitoring"] for e in config["executors"]} == {
        "tuner": 9101,
        "encoder": 9102,
        "indexer": 9103,
    }
    assert config["with"]["port"] == "${{ ENV.CLIPTUNER_PORT }}"  # left for Jina to expand


def test_a_refused_serve_leaves_the_environment_as_it_was(clean_env, tmp_path, capsys):
    import os

    from cliptuner.cli import main

    before = dict(os.environ)
    assert main(["serve", "--workspace", str(tmp_path), "--http-port", "0", "--port", "52000"]) == 2
    assert "--http-port / CLIPTUNER_HTTP_PORT must be a port number in [1, 65535], got '0'" in capsys.readouterr().err
    assert dict(os.environ) == before and not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["flow.yml", "serving.yml", "shards.yml", "k8s.yml"])
def test_every_flow_lets_its_servers_accept_the_gateways_keepalive_pings(name):
    """The keys gRPC reads (grpc.http2.*), not Jina's grpc.http1.* ones: a server keeping gRPC's default refuses
    pings closer than 5 min on a quiet connection, and the gateway then re-sends a long /train."""
    from cliptuner.serve.flows import KEEPALIVE_CHANNEL_OPTIONS, KEEPALIVE_SERVER_OPTIONS

    given = yaml.safe_load((ROOT / "flows" / name).read_text())["with"]
    assert KEEPALIVE_SERVER_OPTIONS.items() <= given["grpc_server_options"].items()
    assert KEEPALIVE_CHANNEL_OPTIONS.items() <= given["grpc_channel_options"].items()
    assert not any(key.startswith("grpc.http1.") for key in given["grpc_server_options"])


def test_flow_config_sets_keepalive_on_every_server_and_the_gateways_channels(tmp_path):
    path = tmp_path / "flow.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "jtype": "Flow",
                "with": {"grpc_server_options": {"grpc.max_receive_message_length": 1000}},
                "executors": [
                    {"name": "a", "uses": "X"},
                    {"name": "b", "uses": "X", "grpc_server_options": {"grpc.max_send_message_length": 7}},
                ],
            }
        )
    )
    config = flow_config(path, {})  # a Flow without them gets the defaults; its own options stay
    server = config["with"]["grpc_server_options"]
    assert server == {"grpc.max_receive_message_length": 1000, "grpc.http2.min_ping_interval_without_data_ms": 5000}
    assert config["with"]["grpc_channel_options"] == {"grpc.http2.max_pings_without_data": 0}
    b = config["executors"][1]["grpc_server_options"]  # an Executor's own options replace the Flow's: merged
    assert b == {**server, "grpc.max_send_message_length": 7}
    quick = flow_config(path, {}, keepalive_ms=800)
    assert quick["with"]["grpc_server_options"]["grpc.http2.min_ping_interval_without_data_ms"] == 400
    assert quick["with"]["grpc_channel_options"]["grpc.keepalive_time_ms"] == 800


def test_serve_binds_the_metrics_servers_to_the_host_it_is_given(monkeypatch):
    import prometheus_client

    from cliptuner.cli.serve import bind_metrics

    calls = []
    monkeypatch.setattr(prometheus_client, "start_http_server", lambda *a, **k: calls.append((a, k)))
    bind_metrics("127.0.0.1")
    bind_metrics("127.0.0.2")  # again: wraps the original, not the wrapper
    prometheus_client.start_http_server(9100, registry="r")  # as Jina calls it
    assert calls == [((9100, "127.0.0.2"), {"registry": "r"})]
    monkeypatch.setattr("multiprocessing.get_start_method", lambda allow_none=False: "spawn")
    with pytest.raises(ValueError, match="needs the Flow's processes forked"):
        bind_metrics("127.0.0.1")
