"""Where the service listens: `cliptuner serve` keeps every socket on 127.0.0.1 unless told otherwise.

Each test starts `cliptuner serve` in its own session and reads which TCP sockets the processes of that session
listen on from ``/proc`` (the socket inodes of ``/proc/<pid>/fd`` matched against ``/proc/net/tcp`` and
``tcp6``), so nothing is ever sent to an address other than 127.0.0.1. The Dockerfile is checked as text:
there is no Docker daemon to build it here.
"""

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from service import ROOT, FlowProcess, free_port, free_ports

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _address(hex_address: str) -> ipaddress._BaseAddress:
    """A /proc/net/tcp{,6} address (32-bit words in host byte order); IPv4-mapped IPv6 as IPv4."""
    raw = bytes.fromhex(hex_address)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    return getattr(address, "ipv4_mapped", None) or address


def listening_sockets() -> dict[str, tuple[ipaddress._BaseAddress, int]]:
    """Every listening TCP socket of this network namespace: inode → (address, port)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == LISTEN:
                    host, port = fields[1].split(":")
                    found[fields[9]] = (_address(host), int(port, 16))
    return found


def session_pids(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[3]) == session:  # fields after comm: state ppid pgrp sid
                pids.append(int(entry))
    return pids


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with os.scandir(f"/proc/{pid}/fd") as fds:
        for fd in fds:
            try:
                match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd.path))
            except OSError:
                continue
            if match:
                inodes.add(match.group(1))
    return inodes


class Serve(FlowProcess):
    """`cliptuner serve ARGS` as a context manager; ``CLIPTUNER_HOST`` comes from ``env`` alone."""

    def __init__(self, workspace: Path, args: list[str], env: dict[str, str]) -> None:
        super().__init__(workspace, workspace.parent / "serve.log", env=env, args=args, unset=("CLIPTUNER_HOST",))

    def __enter__(self) -> "Serve":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def listening(self) -> list[tuple[ipaddress._BaseAddress, int]]:
        """(address, port) of every socket the service's processes listen on."""
        table = listening_sockets()
        return sorted(
            {table[inode] for pid in session_pids(self.proc.pid) for inode in socket_inodes(pid) if inode in table},
            key=lambda item: item[1],
        )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("exposure") / "workspace"


def gateway_and_executors(serve: Serve) -> tuple[list, list]:
    sockets = serve.listening()
    gateway = [address for address, port in sockets if port == serve.port]
    executors = [address for address, port in sockets if port != serve.port]
    assert len(gateway) == 1, (sockets, serve.log_tail())
    assert len(executors) >= 3, (sockets, serve.log_tail())  # tuner, encoder, indexer
    return gateway, executors


def test_serve_listens_on_loopback_only_by_default(workspace):
    http_port, metrics = free_port(), free_ports(4)
    # the search page and JSON API, and the Prometheus ports of the gateway and the three Executors too
    with Serve(workspace, ["--http-port", str(http_port), "--metrics-port", str(metrics)], {}) as serve:
        gateway, executors = gateway_and_executors(serve)
        listening = serve.listening()
    loopback = ipaddress.ip_address("127.0.0.1")
    assert (loopback, http_port) in listening
    assert {port for address, port in listening if address == loopback} >= set(range(metrics, metrics + 4))
    assert gateway == [loopback]
    assert all(address == loopback for address in executors), executors


def test_metrics_listen_where_told_apart_from_the_gateway(workspace):
    metrics = free_ports(4)
    args = ["--host", "0.0.0.0", "--insecure-no-auth", "--metrics-port", str(metrics), "--metrics-host", "127.0.0.1"]
    with Serve(workspace, args, {}) as serve:
        listening = serve.listening()
    on_metrics = sorted(address for address, port in listening if metrics <= port < metrics + 4)
    assert on_metrics == [ipaddress.ip_address("127.0.0.1")] * 4, listening


@pytest.mark.parametrize(
    "args, env, executors_at_least",
    [
        (["--host", "0.0.0.0", "--insecure-no-auth"], {}, 3),
        ([], {"CLIPTUNER_HOST": "0.0.0.0", "CLIPTUNER_INSECURE_NO_AUTH": "1"}, 3),
        # + the indexer's head, its second shard, the merger
        (["--host", "0.0.0.0", "--index-shards", "2", "--insecure-no-auth"], {}, 6),
    ],
    ids=["--host", "CLIPTUNER_HOST", "sharded"],
)
def test_serve_opens_the_gateway_alone_to_every_interface_when_told(workspace, args, env, executors_at_least):
    with Serve(workspace, args, env) as serve:
        gateway, executors = gateway_and_executors(serve)
    assert len(gateway) == 1 and gateway[0].is_unspecified  # 0.0.0.0, or :: (gRPC's dual-stack bind)
    assert len(executors) >= executors_at_least, executors
    assert all(address == ipaddress.ip_address("127.0.0.1") for address in executors), executors


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--host", "0.0.0.0"], {}, ("--keys-file", "--insecure-no-auth")),
        ([], {"CLIPTUNER_HOST": "0.0.0.0"}, ("--keys-file", "--insecure-no-auth")),
        # the Docker image's default: CLIPTUNER_KEYS_FILE names a file that was not mounted
        (["--host", "0.0.0.0"], {"CLIPTUNER_KEYS_FILE": "/etc/cliptuner/keys/keys.json"}, ("keys file",)),
    ],
    ids=["--host", "CLIPTUNER_HOST", "missing-keys-file"],
)
def test_serve_refuses_every_interface_without_keys(tmp_path, args, env, expected):
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CLIPTUNER_HOST", "CLIPTUNER_KEYS_FILE", "CLIPTUNER_INSECURE_NO_AUTH")
    }
    result = subprocess.run(
        [sys.executable, "-m", "cliptuner.cli", "serve", "--workspace", str(tmp_path / "ws"), *args],
        cwd=ROOT,
        env={**inherited, "CLIPTUNER_PORT": str(free_port()), "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,  # refused before the Flow starts
    )
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]
    if "CLIPTUNER_KEYS_FILE" in env:
        assert "'/etc/cliptuner/keys/keys.json' is missing" in result.stderr


def test_host_option_wins_over_the_environment(workspace):
    with Serve(workspace, ["--host", "127.0.0.1"], {"CLIPTUNER_HOST": "0.0.0.0"}) as serve:
        gateway, _ = gateway_and_executors(serve)
    assert gateway == [ipaddress.ip_address("127.0.0.1")]


# -- the Docker image --------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def test_the_image_runs_as_a_user_and_its_gateway_listens_on_every_interface():
    instructions = dockerfile_instructions(ROOT / "Dockerfile")
    users = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "USER"]
    assert users, "the Dockerfile sets no USER: the service would run as root"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    cmd_at = max(i for i, (keyword, _) in enumerate(instructions) if keyword in ("CMD", "ENTRYPOINT"))
    assert last_user_at < cmd_at  # the service starts as that user
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert re.search(r"(^|\s)CLIPTUNER_HOST=0\.0\.0\.0(\s|$)", env), env
    created = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(rf"(useradd|adduser)\b.*\b{re.escape(user.split(':')[0])}\b", created)  # the user exists
    assert re.search(r"chown\b.*\s/workspace\b", created)  # and may write the workspace volume


def test_the_image_requires_a_mounted_keys_file():
    # `cliptuner serve` in the image listens on 0.0.0.0, which needs keys: the image names the file to mount
    instructions = dockerfile_instructions(ROOT / "Dockerfile")
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert re.search(r"(^|\s)CLIPTUNER_KEYS_FILE=/etc/cliptuner/keys/keys\.json(\s|$)", env), env
    assert not re.search(r"CLIPTUNER_INSECURE_NO_AUTH=\S", env)  # never open by default
    text = (ROOT / "Dockerfile").read_text()
    assert "-v $PWD/keys.json:/etc/cliptuner/keys/keys.json:ro" in text  # the documented mount
