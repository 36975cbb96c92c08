"""Training on several nodes as a Kubernetes Indexed Job (:mod:`cliptuner.serve.cluster`), without a cluster.

The manifests are validated strictly against the Kubernetes 1.29 schemas (``kubernetes-validate``). A run is
followed against :class:`FakeKube`, an API server on 127.0.0.1 that stores Jobs and Services as the real one does
and, like the Job controller and the kubelet together, "runs the pods" of a created Job: each index's container
command here, with the kubelet's ``$(VAR)`` expansion and downward-API values (the pod IP is 127.0.0.1), the Job
Complete when every pod exited 0 and Failed (the other pods stopped) as soon as one did not. Most runs replace the
torchrun command line after the node launcher with a stand-in (a Python one-liner, no torch), so that each way a
run ends is fast; the last tests run the real command: two torchrun launchers, ``--nnodes 2``, meeting through
c10d rendezvous on 127.0.0.1, training the tiny model and exporting it (about 15 s on 2 CPUs), and a torchrun node
stopped because its peer failed.

The service's side: :class:`~cliptuner.serve.runs.TrainingRuns` given a cluster and the fake API server trains a
claimed request as a Job of two nodes and publishes it into the registry as it publishes a local run; a node that
fails and a cancel publish nothing and delete the Job. The tuner's ``train_cluster`` setting is checked by name.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
from certificates import self_signed

from cliptuner.config import GateConfig, ModelSpec, TrainConfig
from cliptuner.model.registry import Registry
from cliptuner.serve import cluster_node, runs
from cliptuner.serve.cluster import (
    KubeAPI,
    KubeAPIError,
    KubernetesJobRun,
    TrainingCluster,
    in_cluster_namespace,
    job_manifests,
    job_name,
    stop_leftover_job,
    training_network_policy,
    training_rbac,
)
from cliptuner.serve.launch import free_port
from cliptuner.serve.worker_events import PROCESS_FILE, TrainingProcessError, TrainingProcessInputError
from cliptuner.train import synthetic
from cliptuner.train.job import TrainJob

K8S_VERSION = "1.29"
TOKEN = "test-token"
NAMESPACE = "cliptuner"
RUN_ID = "20250101-120000-abc123"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# -- a fake API server that runs the pods of the Jobs it is given ---------------------------------------------------
_PATH = re.compile(r"^/(api/v1|apis/batch/v1)/namespaces/([^/]+)/(jobs|services|pods)(?:/([^/]+))?$")
_KINDS = {"jobs": "Job", "services": "Service", "pods": "Pod"}
_GROUPS = {"jobs": "batch", "services": "", "pods": ""}


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of ``$(VAR)`` in a container's command and args (``$$`` escapes a ``$``)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


class FakePod:
    """One index of a Job: its container's command as a local process (in a process group of its own)."""

    def __init__(self, job: dict, index: int, argv: list[str], env: dict[str, str], cwd: str, stdout: Path) -> None:
        self.index = index
        self.name = f"{job['metadata']['name']}-{index}-{uuid.uuid4().hex[:5]}"
        self.labels = dict(job["spec"]["template"]["metadata"]["labels"])
        self.argv = argv
        self.stdout_path = stdout
        self.waiting: Optional[dict] = None  # the container's waiting state when it cannot start
        self.proc: Optional[subprocess.Popen] = None
        if argv:
            with stdout.open("wb") as out:
                self.proc = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )

    def poll(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def terminate(self, grace: float = 20.0) -> None:
        """As the kubelet stops a container: SIGTERM to its first process, SIGKILL to all after ``grace``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(15)

    def as_object(self, namespace: str) -> dict:
        code = self.poll()
        if self.waiting is not None:
            phase, state = "Pending", {"waiting": self.waiting}
        elif code is None:
            phase, state = "Running", {"running": {}}
        else:
            phase, state = ("Succeeded" if code == 0 else "Failed"), {"terminated": {"exitCode": code}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": namespace, "labels": self.labels},
            "status": {"phase": phase, "containerStatuses": [{"name": "train", "state": state}]},
        }


class FakeKube:
    """An API server on 127.0.0.1 (plain HTTP, or HTTPS with ``tls``) for Jobs, Services and Pods.

    Args:
        folder: where the pods' stdout files go (``kubectl logs``).
        stand_in: turns a pod's command line into the one run (None: run it as it is).
        forbid: ``(HTTP method, resource)`` pairs answered 403 as RBAC does.
        unpullable: images whose pods never start (``ErrImagePull``).
        tls: ``(cert file, key file)`` to serve HTTPS.
    """

    def __init__(
        self,
        folder: Path,
        stand_in: Optional[Callable[[list[str], int], list[str]]] = None,
        forbid: frozenset = frozenset(),
        unpullable: frozenset = frozenset(),
        tls: Optional[tuple[Path, Path]] = None,
    ) -> None:
        self.folder = folder
        self.stand_in = stand_in
        self.forbid = set(forbid)
        self.unpullable = set(unpullable)
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.pods: dict[str, list[FakePod]] = {}  # job name -> its pods
        self.requests: list[dict] = []
        self.unavailable = False  # answer 503 to everything
        self.lock = threading.RLock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                fake.handle(self, "GET")

            def do_POST(self) -> None:
                fake.handle(self, "POST")

            def do_DELETE(self) -> None:
                fake.handle(self, "DELETE")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, tls))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for pods in self.pods.values():
            for pod in pods:
                pod.terminate(grace=5)

    # -- the API --------------------------------------------------------------------------------------------------
    def handle(self, request: http.server.BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        length = int(request.headers.get("Content-Length") or 0)
        body = json.loads(request.rfile.read(length)) if length else None
        self.requests.append(
            {
                "method": method,
                "path": url.path,
                "query": url.query,
                "body": body,
                "auth": request.headers.get("Authorization"),
            }
        )
        status, answer = self.answer(
            method, url.path, urllib.parse.parse_qs(url.query), body, request.headers.get("Authorization")
        )
        data = json.dumps(answer).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    @staticmethod
    def status(code: int, reason: str, message: str) -> tuple[int, dict]:
        return code, {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }

    def answer(
        self, method: str, path: str, query: dict, body: Optional[dict], auth: Optional[str]
    ) -> tuple[int, dict]:
        if auth != f"Bearer {TOKEN}":
            return self.status(401, "Unauthorized", "Unauthorized")
        if self.unavailable:
            return self.status(503, "ServiceUnavailable", "the server is currently unable to handle the request")
        match = _PATH.match(path)
        if not match:
            return self.status(404, "NotFound", f"the server could not find the requested resource {path}")
        _, namespace, resource, name = match.groups()
        kind = _KINDS[resource]
        verb = {"POST": "create", "DELETE": "delete"}.get(method) or ("get" if name else "list")
        if (method, resource) in self.forbid:
            group = _GROUPS[resource]
            return self.status(
                403,
                "Forbidden",
                f'{resource}{"." + group if group else ""} is forbidden: User "system:serviceaccount:{namespace}:'
                f'cliptuner-tuner" cannot {verb} resource "{resource}" in API group "{group}" in the namespace '
                f'"{namespace}"',
            )
        with self.lock:
            if method == "POST":
                return self.create(kind, namespace, body)
            if kind == "Pod":
                return 200, {"kind": "PodList", "items": self.list_pods(namespace, query)}
            key = (kind, namespace, name)
            if key not in self.objects:
                return self.status(404, "NotFound", f'{resource} "{name}" not found')
            if method == "GET":
                return 200, self.refreshed(key)
            return self.delete(key, body or {})

    def create(self, kind: str, namespace: str, obj: dict) -> tuple[int, dict]:
        key = (kind, namespace, obj["metadata"]["name"])
        if key in self.objects:
            return self.status(409, "AlreadyExists", f'{kind.lower()}s "{key[2]}" already exists')
        obj = copy.deepcopy(obj)
        obj["metadata"]["uid"] = str(uuid.uuid4())
        obj["status"] = {}
        self.objects[key] = obj
        if kind == "Job":
            self.pods[key[2]] = [self.run_pod(obj, index) for index in range(obj["spec"]["completions"])]
            obj["status"] = {"active": len(self.pods[key[2]])}
        return 201, obj

    def run_pod(self, job: dict, index: int) -> FakePod:
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # the image's python
        fields = {"status.podIP": "127.0.0.1", f"metadata.annotations['{INDEX_ANNOTATION}']": str(index)}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
            else:
                env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        env["JOB_COMPLETION_INDEX"] = str(index)  # what the Job controller adds to an Indexed Job's pods
        argv = [expand(a, env) for a in container.get("command", []) + container.get("args", [])]
        if self.stand_in is not None:
            argv = self.stand_in(argv, index)
        stdout = self.folder / f"{job['metadata']['name']}-{index}.stdout"
        if container["image"] in self.unpullable:
            pod = FakePod(job, index, [], env, container.get("workingDir", "/"), stdout)
            pod.waiting = {"reason": "ErrImagePull", "message": f"pull access denied for {container['image']}"}
            return pod
        return FakePod(job, index, argv, env, container.get("workingDir", "/"), stdout)

    def refreshed(self, key: tuple[str, str, str]) -> dict:
        """The object with the status the Job controller would give it now."""
        obj = self.objects[key]
        if key[0] != "Job" or any(c["status"] == "True" for c in obj["status"].get("conditions", [])):
            return obj
        pods = self.pods[key[2]]
        codes = [pod.poll() for pod in pods]
        if any(code not in (None, 0) for code in codes):  # backoffLimit 0: the Job fails, its other pods stop
            for pod in pods:
                pod.terminate()
            obj["status"] = {
                "failed": sum(pod.poll() != 0 for pod in pods),
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                    }
                ],
            }
        elif all(code == 0 for code in codes):
            obj["status"] = {"succeeded": len(pods), "conditions": [{"type": "Complete", "status": "True"}]}
        else:
            obj["status"] = {"active": sum(code is None for code in codes)}
        return obj

    def list_pods(self, namespace: str, query: dict) -> list[dict]:
        selector = dict(part.split("=", 1) for part in query.get("labelSelector", [""])[0].split(",") if part)
        return [
            pod.as_object(namespace)
            for pods in self.pods.values()
            for pod in pods
            if all(pod.labels.get(k) == v for k, v in selector.items())
        ]

    def delete(self, key: tuple[str, str, str], options: dict) -> tuple[int, dict]:
        obj = self.objects.pop(key)
        if key[0] == "Job":
            for pod in self.pods.get(key[2], []):  # foreground or background, the pods go
                pod.terminate()
            uid = obj["metadata"]["uid"]
            for other in [
                k
                for k, o in self.objects.items()
                if any(r["uid"] == uid for r in o["metadata"].get("ownerReferences", []))
            ]:
                del self.objects[other]  # the garbage collector takes what the Job owned
        return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": key[2]}}

    # -- what a test looks at -------------------------------------------------------------------------------------
    def calls(self) -> list[tuple[str, str]]:
        """``(verb, resource)`` of every request, as RBAC names them."""
        out = []
        for r in self.requests:
            match = _PATH.match(r["path"])
            if match:
                verb = {"POST": "create", "DELETE": "delete"}.get(r["method"]) or ("get" if match.group(4) else "list")
                out.append((verb, match.group(3)))
        return out


# -- stand-ins for torchrun (fast runs) ------------------------------------------------------------------------------
# `python -c STAND_IN MODE <torchrun's argv>`: node 0 writes events as rank 0 does; each node records what it saw
STAND_IN = textwrap.dedent(
    """
    import json, os, shutil, signal, sys, time

    mode, argv = sys.argv[1], sys.argv[2:]
    index = int(os.environ["JOB_COMPLETION_INDEX"])
    events = argv[argv.index("--events") + 1]
    job = json.load(open(argv[argv.index("cliptuner.train.worker") + 1]))
    seen = {"rdzv_conf": os.environ.get("PET_RDZV_CONF"), "local_addr": argv[argv.index("--local_addr") + 1],
            "cwd": os.getcwd(), "nnodes": argv[argv.index("--nnodes") + 1]}
    open(f"seen-{index}.json", "w").write(json.dumps(seen))

    def emit(event):
        with open(events, "a") as fh:
            fh.write(json.dumps({**event, "pid": os.getpid()}) + "\\n")

    def stopped(signum, frame):
        open(f"terminated-{index}", "w").write(str(signum))
        sys.exit(143)

    signal.signal(signal.SIGTERM, stopped)
    print(f"stand-in node {index} ({mode})", flush=True)
    if index == 0:
        emit({"event": "loaded", "world_size": int(seen["nnodes"]), "device": "cpu"})
    if mode == "ok" and index == 0:
        emit({"event": "step", "epoch": 1, "epochs": 1, "step": 1, "total_steps": 1, "loss": 2.5})
        emit({"event": "after", "metrics": {"t2i_r5": 0.4}})
    if mode == "train" and index == 0:
        emit({"event": "before", "metrics": {"t2i_r5": 0.1}})
        emit({"event": "step", "epoch": 1, "epochs": 3, "step": 1, "total_steps": 30, "loss": 2.5})
    if mode == "publish" and index == 0:
        shutil.copytree(os.environ["FAKE_MODEL"], job["out"])
        split = {"train_images": 18, "train_pairs": 36, "eval_images": 6, "eval_pairs": 12}
        report = {"before": {"t2i_r5": 0.1}, "after": {"t2i_r5": 0.4}, "epochs": 1, "split": split,
                  "model_version": "model", "model": {"arch": "x"}, "wall_seconds": 1.0}
        open(os.path.join(job["out"], "report.json"), "w").write(json.dumps(report))
        emit({"event": "after", "metrics": report["after"]})
    if mode == "crash" and index == 1:
        print("RuntimeError: boom on node 1", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "input" and index == 1:
        emit({"event": "failed", "phase": "loading", "kind": "input", "rank": 1,
              "message": "image 'cat' (/nowhere/cat.png): cannot decode image"})
        sys.exit(2)
    if mode in ("crash", "input", "hang", "train"):
        time.sleep(600)
    """
)


def stand_in(mode: str) -> Callable[[list[str], int], list[str]]:
    """Keep the node launcher, run the stand-in in place of torchrun (given torchrun's argv to read)."""

    def replace(argv: list[str], index: int) -> list[str]:
        split = argv.index("--")
        return [*argv[: split + 1], sys.executable, "-c", STAND_IN, mode, *argv[split + 1 :]]

    return replace


# -- fixtures and helpers --------------------------------------------------------------------------------------------
def make_fake(tmp_path: Path, **kwargs: Any) -> FakeKube:
    folder = tmp_path / "pods"
    folder.mkdir(exist_ok=True)
    return FakeKube(folder, **kwargs)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "workspace" / "runs" / RUN_ID
    (path / "inputs").mkdir(parents=True)
    TrainJob(data=str(path / "inputs" / "train.csv"), out=str(path / "model")).write(path / "inputs" / "job.json")
    return path


def cluster_of(tmp_path: Path, **options: Any) -> TrainingCluster:
    values = {
        "image": "cliptuner-tuner:test",
        "nodes": 2,
        "namespace": NAMESPACE,
        "workspace_mount": str(tmp_path / "workspace"),
        "rendezvous_host": "127.0.0.1",
        "port": free_port(),
        "cpu": "1",
        "memory": "2Gi",
        "termination_grace_s": 5,
    }
    return TrainingCluster(**{**values, **options})


def job_run(fake: FakeKube, cluster: TrainingCluster, run_dir: Path, **kwargs: Any) -> KubernetesJobRun:
    options = {"poll_interval_s": 0.05, "pods_check_s": 0.05, **kwargs}
    return KubernetesJobRun(
        KubeAPI(fake.url, token=TOKEN),
        cluster,
        RUN_ID,
        run_dir / "inputs" / "job.json",
        run_dir / "events.jsonl",
        **options,
    )


def follow(run: KubernetesJobRun, timeout: float = 120.0) -> tuple[int, list[dict]]:
    """Follow a started run as the tuner does (poll, then read the events) until it ends; its status and events."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = run.poll()
        run.read_events(events.append, lambda: False)
        if code is not None:
            return code, events
        time.sleep(0.05)
    run.stop()
    pytest.fail(f"the run did not end within {timeout}s; node logs: {run.log_tail(20)}")


def validate(obj: dict) -> None:
    """Check ``obj`` against the Kubernetes schemas strictly (no unknown field); raises on the first error."""
    import kubernetes_validate  # in the dev extra: pip install -e '.[dev]'

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# -- the manifests ---------------------------------------------------------------------------------------------------
def test_the_job_and_service_validate_strictly_and_run_torchrun_with_c10d_rendezvous_on_pod_0():
    service, job = job_manifests(
        RUN_ID,
        Path("/workspace/runs") / RUN_ID / "inputs" / "job.json",
        Path("/workspace/runs") / RUN_ID / "events.jsonl",
        image="registry.example.com/cliptuner-tuner:1.2",
        namespace="ml",
        nodes=3,
        procs_per_node=2,
        workspace_claim="shared-workspace",
        gpus_per_node=2,
        cpu="8",
        memory="32Gi",
        service_account="trainer",
        extra_env={"NCCL_DEBUG": "WARN"},
        active_deadline_s=7200,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    for obj in (service, job):
        validate(obj)
    name = job_name(RUN_ID)
    assert service["metadata"]["name"] == job["metadata"]["name"] == name == f"cliptuner-train-{RUN_ID}"
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"] == "ml"
    labels = {"app.kubernetes.io/name": "cliptuner", "app.kubernetes.io/component": "training", "cliptuner/run": RUN_ID}
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == labels == job["metadata"]["labels"]
    assert service["spec"]["ports"][0]["port"] == 29500

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert (
        spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 3600 and spec["activeDeadlineSeconds"] == 7200
    )
    pod = spec["template"]
    assert pod["metadata"]["labels"] == labels  # the Service selects the pods
    pod_spec = pod["spec"]
    assert pod_spec["subdomain"] == name and pod_spec["restartPolicy"] == "Never"
    assert pod_spec["serviceAccountName"] == "trainer" and pod_spec["automountServiceAccountToken"] is False
    security = pod_spec["securityContext"]
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == 10001 and security["runAsNonRoot"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "shared-workspace"}} in pod_spec["volumes"]
    assert (
        pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        and pod_spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    (container,) = pod_spec["containers"]
    assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"},
    }
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["NCCL_DEBUG"] == "WARN" and env["OMP_NUM_THREADS"] == "4"  # 8 CPUs for 2 processes
    run_dir = f"/workspace/runs/{RUN_ID}"
    assert container["command"] == ["python", "-m", "cliptuner.serve.cluster_node", "--log-dir", run_dir, "--"]
    assert container["workingDir"] == run_dir
    assert container["args"] == [
        "python", "-m", "torch.distributed.run",
        "--nnodes", "3", "--nproc_per_node", "2",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{name}-0.{name}:29500", "--rdzv_id", RUN_ID,
        "--local_addr", "$(POD_IP)", "--max_restarts", "0",
        "-m", "cliptuner.train.worker", f"{run_dir}/inputs/job.json", "--events", f"{run_dir}/events.jsonl",
    ]  # fmt: skip
    assert "--node_rank" not in container["args"]  # the rendezvous assigns the node ranks
    assert len(f"{name}-99") <= 63  # a pod's host name


def test_the_validation_is_strict_enough_to_catch_a_misspelled_field():
    _, job = job_manifests(
        RUN_ID, Path("/workspace/r/job.json"), Path("/workspace/r/events.jsonl"), image="x:1", nodes=2
    )
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")
    import kubernetes_validate

    with pytest.raises(kubernetes_validate.ValidationError, match="completionsMode"):
        validate(job)


def test_the_rbac_objects_and_the_network_policy_validate_strictly():
    objects = [*training_rbac(NAMESPACE, "cliptuner-tuner"), training_network_policy(NAMESPACE)]
    objects.append(training_network_policy(NAMESPACE, restrict_egress=True))
    for obj in objects:
        validate(obj)
    account, role, binding = objects[:3]
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "cliptuner-tuner"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cliptuner-tuner", "namespace": NAMESPACE}]
    policy = objects[3]["spec"]
    training = {"app.kubernetes.io/name": "cliptuner", "app.kubernetes.io/component": "training"}
    assert policy["podSelector"] == {"matchLabels": training} and policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": training}}], "ports": [{"protocol": "TCP"}]}]
    egress = objects[4]["spec"]
    assert egress["policyTypes"] == ["Ingress", "Egress"] and len(egress["egress"]) == 2


def test_the_role_allows_every_call_a_run_makes(tmp_path, run_dir):
    """The calls of a whole run (start, polls, the pods check, a stop) are each allowed by training_rbac's Role."""
    fake = make_fake(tmp_path, stand_in=stand_in("ok"))
    try:
        run = job_run(fake, cluster_of(tmp_path), run_dir)
        run.start()
        assert follow(run)[0] == 0
        run.stop()
        assert stop_leftover_job(KubeAPI(fake.url, token=TOKEN), run_dir) is not None
    finally:
        fake.close()
    role = training_rbac(NAMESPACE)[1]
    allowed = {(verb, resource) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    calls = set(fake.calls())
    assert {("create", "jobs"), ("get", "jobs"), ("create", "services"), ("list", "pods"), ("delete", "jobs")} <= calls
    assert calls <= allowed


def test_names_are_dns_labels_derived_from_the_run_id():
    assert job_name("20250101-120000-ABC123") == "cliptuner-train-20250101-120000-abc123"
    assert job_name("run_1.a") == "cliptuner-train-run-1-a"
    long_a, long_b = "a" * 60 + "x", "a" * 60 + "y"
    assert len(job_name(long_a)) <= 52 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job_name(long_a))
    assert job_name(long_a) != job_name(long_b)  # cut, but told apart by a hash of the whole id
    for bad in ("", "-run", "run id", "a" * 64, 7):
        with pytest.raises(ValueError, match="must be a label value"):
            job_name(bad)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"nodes": 0}, "nodes must be an integer >= 1, got 0"),
        ({"nodes": True}, "nodes must be an integer >= 1, got True"),
        ({"procs_per_node": 4, "gpus_per_node": 2}, r"procs_per_node \(4\) must not exceed gpus_per_node \(2\)"),
        ({"namespace": "ML"}, "namespace must be a DNS label"),
        ({"workspace_claim": "bad_claim"}, "workspace_claim must be a DNS subdomain"),
        ({"cpu": "two"}, "cpu must be a CPU quantity"),
        ({"memory": "8GB"}, "memory must be a memory quantity"),
        ({"port": 70000}, r"port must be in 1\.\.65535, got 70000"),
        (
            {"extra_env": {"POD_IP": "1.2.3.4"}},
            "extra_env: 'POD_IP' is not an environment variable name the Job may take",
        ),
        ({"extra_env": {"1X": "a"}}, "extra_env: '1X'"),
        ({"image": "has space:1"}, "image must be an image reference without spaces"),
        ({"workspace_mount": "workspace"}, "workspace_mount must be an absolute path"),
        ({"colour": "red"}, r"unknown training cluster option\(s\) \['colour'\]"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    values = {"image": "cliptuner-tuner:1", "nodes": 2, **options}
    with pytest.raises(ValueError, match=message):
        job_manifests(RUN_ID, Path("/workspace/r/job.json"), Path("/workspace/r/events.jsonl"), **values)


def test_a_job_file_off_the_workspace_volume_is_refused():
    with pytest.raises(ValueError, match=r"the job file '/tmp/job.json' must be on the shared workspace volume"):
        job_manifests(RUN_ID, Path("/tmp/job.json"), Path("/workspace/r/events.jsonl"), image="x:1", nodes=2)
    with pytest.raises(ValueError, match=r"a training Job needs \['nodes'\]"):
        job_manifests(RUN_ID, Path("/workspace/r/job.json"), Path("/workspace/r/events.jsonl"), image="x:1")


# -- following a run against the fake API server ---------------------------------------------------------------------
def test_a_run_creates_its_job_and_service_and_follows_the_pods_to_completion(tmp_path, run_dir):
    fake = make_fake(tmp_path, stand_in=stand_in("ok"))
    try:
        cluster = cluster_of(tmp_path)
        run = job_run(fake, cluster, run_dir)
        assert run.pid is None and run.poll() is None  # nothing to poll before it started
        run.start()
        name = job_name(RUN_ID)
        job = fake.objects[("Job", NAMESPACE, name)]
        service = fake.objects[("Service", NAMESPACE, name)]
        # the Job first: the Service is owned by it, so the Job's deletion (a stop, its TTL) takes the Service too
        assert [r["path"].rsplit("/", 1)[-1] for r in fake.requests[:2]] == ["jobs", "services"]
        assert service["metadata"]["ownerReferences"] == [
            {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"]}
        ]
        assert all(r["auth"] == f"Bearer {TOKEN}" for r in fake.requests)
        assert json.loads((run_dir / PROCESS_FILE).read_text()) == {
            "job": name,
            "service": name,
            "namespace": NAMESPACE,
        }

        code, events = follow(run)
        assert code == 0 and run.failed is None
        assert [e["event"] for e in events] == ["loaded", "step", "after"]  # node 0's, as rank 0 writes them
        assert events[0]["world_size"] == 2
        for index in (0, 1):
            seen = json.loads((run_dir / f"seen-{index}.json").read_text())
            # node 0 hosts the rendezvous store, node 1 does not; $(POD_IP) was expanded; the run dir is the cwd
            assert seen == {
                "rdzv_conf": f"is_host={int(index == 0)}",
                "local_addr": "127.0.0.1",
                "cwd": str(run_dir),
                "nnodes": "2",
            }
            assert json.loads((run_dir / f"node-{index}.json").read_text())["returncode"] == 0
            log = (run_dir / f"train-{index}.log").read_text()
            assert f"stand-in node {index} (ok)" in log  # the node's output on the shared volume ...
            assert (
                f"stand-in node {index} (ok)" in (fake.folder / f"{name}-{index}.stdout").read_text()
            )  # ... and in its pod log
        run.stop()
        assert ("Job", NAMESPACE, name) not in fake.objects and ("Service", NAMESPACE, name) not in fake.objects
        delete = next(r for r in fake.requests if r["method"] == "DELETE" and "/jobs/" in r["path"])
        assert delete["body"]["propagationPolicy"] == "Foreground"
    finally:
        fake.close()


def test_a_node_that_fails_fails_the_run_with_the_job_the_node_and_its_log_named(tmp_path, run_dir):
    fake = make_fake(tmp_path, stand_in=stand_in("crash"))
    try:
        run = job_run(fake, cluster_of(tmp_path), run_dir)
        run.start()
        code, _ = follow(run)
        assert code != 0
        error = run.failure(code, lambda message: message)
        assert type(error) is TrainingProcessError and error.returncode == code
        message = str(error)
        assert message.startswith(f"training job {NAMESPACE}/{job_name(RUN_ID)} failed (BackoffLimitExceeded")
        assert "node 1 exited with code 3" in message  # the node that failed first, with its own status
        assert "without reporting why; its log ends:\ntrain-1.log:" in message
        assert "RuntimeError: boom on node 1" in message
        assert (run_dir / "terminated-0").read_text() == str(
            int(signal.SIGTERM)
        )  # node 0 was stopped, through its launcher
    finally:
        fake.close()


def test_a_failed_event_of_any_rank_is_the_cause_and_bad_input_stays_an_input_error(tmp_path, run_dir):
    fake = make_fake(tmp_path, stand_in=stand_in("input"))
    try:
        run = job_run(fake, cluster_of(tmp_path), run_dir)
        run.start()
        code, events = follow(run)
        assert code != 0 and run.failed is not None and run.failed["rank"] == 1
        error = run.failure(code, lambda message: message.replace("/nowhere/", ""))
        assert isinstance(error, TrainingProcessInputError) and isinstance(error, ValueError)
        assert "node 1 exited with code 2" in str(error)  # the node that failed first
        assert str(error).endswith(": image 'cat' (cat.png): cannot decode image")
    finally:
        fake.close()


def test_stop_deletes_the_job_and_its_pods_get_sigterm_through_the_launcher(tmp_path, run_dir):
    fake = make_fake(tmp_path, stand_in=stand_in("hang"))
    try:
        run = job_run(fake, cluster_of(tmp_path), run_dir)
        run.start()
        deadline = time.monotonic() + 60
        while not all((run_dir / f"seen-{i}.json").exists() for i in (0, 1)) and time.monotonic() < deadline:
            assert run.poll() is None
            time.sleep(0.05)
        run.stop()
        run.stop()  # once is enough; a second stop does nothing
        for index in (0, 1):
            assert (run_dir / f"terminated-{index}").read_text() == str(int(signal.SIGTERM))
            status = json.loads((run_dir / f"node-{index}.json").read_text())
            assert status["returncode"] == 143
        assert not fake.objects
        assert [r["method"] for r in fake.requests].count("DELETE") == 2  # the Job, then its Service
        assert all(pod.poll() is not None for pods in fake.pods.values() for pod in pods)
    finally:
        fake.close()


def test_a_missing_permission_is_named(tmp_path, run_dir):
    fake = make_fake(tmp_path, forbid=frozenset({("POST", "jobs")}))
    try:
        run = job_run(fake, cluster_of(tmp_path), run_dir)
        with pytest.raises(KubeAPIError) as caught:
            run.start()
        message = str(caught.value)
        assert message.startswith(
            f"cannot create Job {NAMESPACE}/{job_name(RUN_ID)}: HTTP 403 Forbidden: jobs.batch is forbidden"
        )
        assert "needs the permission 'create' on 'jobs' in API group 'batch' in namespace 'cliptuner'" in message
        assert caught.value.status == 403 and not caught.value.transient
        assert not fake.pods  # nothing ran
    finally:
        fake.close()


def test_a_refused_service_deletes_the_job_it_followed(tmp_path, run_dir):
    fake = make_fake(tmp_path, stand_in=stand_in("hang"), forbid=frozenset({("POST", "services")}))
    try:
        run = job_run(fake, cluster_of(tmp_path), run_dir)
        with pytest.raises(KubeAPIError, match=f"cannot create Service {NAMESPACE}/{job_name(RUN_ID)}: HTTP 403"):
            run.start()
        assert not fake.objects  # the Job went again
        assert all(pod.poll() is not None for pods in fake.pods.values() for pod in pods)
    finally:
        fake.close()


def test_pods_that_cannot_start_their_container_fail_the_run(tmp_path, run_dir):
    fake = make_fake(tmp_path, unpullable=frozenset({"cliptuner-tuner:missing"}))
    try:
        run = job_run(fake, cluster_of(tmp_path, image="cliptuner-tuner:missing"), run_dir, unstartable_grace_s=0)
        run.start()
        code, _ = follow(run)
        assert code == 1
        message = str(run.failure(code, lambda m: m))
        assert re.search(
            rf"pod {job_name(RUN_ID)}-\d-\w+ cannot start its container: ErrImagePull: pull access denied", message
        )
        assert message.endswith("its log ends:\nno output")
    finally:
        fake.close()


def test_a_job_deleted_from_outside_fails_the_run(tmp_path, run_dir):
    fake = make_fake(tmp_path, stand_in=stand_in("hang"))
    try:
        run = job_run(fake, cluster_of(tmp_path), run_dir)
        run.start()
        KubeAPI(fake.url, token=TOKEN).delete("Job", NAMESPACE, job_name(RUN_ID))
        code, _ = follow(run)
        assert code == 1 and "the Job was deleted before it finished" in str(run.failure(code, lambda m: m))
    finally:
        fake.close()


def test_an_api_server_that_does_not_answer_is_waited_out_then_given_up(tmp_path, run_dir):
    fake = make_fake(tmp_path, stand_in=stand_in("hang"))
    try:
        patient = job_run(fake, cluster_of(tmp_path), run_dir, api_error_grace_s=3600)
        patient.start()
        fake.unavailable = True
        assert patient.poll() is None  # a 503 may pass: the run goes on
        impatient = job_run(fake, cluster_of(tmp_path), run_dir, api_error_grace_s=0)
        impatient.created = True  # the same Job, followed by a run that waits out nothing
        with pytest.raises(KubeAPIError, match=r"cannot get Job .*: HTTP 503 ServiceUnavailable.*the run is given up"):
            impatient.poll()
        fake.unavailable = False
        patient.stop()
    finally:
        fake.close()


def test_a_leftover_job_named_by_an_unfinished_run_is_deleted(tmp_path, run_dir):
    fake = make_fake(tmp_path, stand_in=stand_in("hang"))
    try:
        job_run(fake, cluster_of(tmp_path), run_dir).start()  # a tuner that then died
        api = KubeAPI(fake.url, token=TOKEN)
        assert stop_leftover_job(api, run_dir) == f"{NAMESPACE}/{job_name(RUN_ID)}"
        assert not fake.objects and all(pod.poll() is not None for pods in fake.pods.values() for pod in pods)
        assert stop_leftover_job(api, tmp_path) is None  # no process.json there
    finally:
        fake.close()


# -- the API client ---------------------------------------------------------------------------------------------------
def test_in_a_pod_the_api_is_reached_over_https_with_the_service_accounts_ca_and_token(tmp_path, monkeypatch):
    account = tmp_path / "serviceaccount"
    account.mkdir()
    ca, key = self_signed(account, cert_name="ca.crt")
    (account / "token").write_text(TOKEN + "\n")
    (account / "namespace").write_text(NAMESPACE)
    fake = make_fake(tmp_path, tls=(ca, key))
    try:
        port = fake.url.rsplit(":", 1)[1]
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
        api = KubeAPI.in_cluster(account_dir=account)
        assert api.base_url == fake.url and in_cluster_namespace(account) == NAMESPACE
        assert api.list_objects("Pod", NAMESPACE, "cliptuner/run=x") == []
        (account / "token").write_text("rotated")  # the kubelet rotates the token: each request reads it again
        with pytest.raises(KubeAPIError, match="HTTP 401 Unauthorized.*refused the service account token"):
            api.get("Job", NAMESPACE, "j")
        untrusting = KubeAPI(fake.url, token=TOKEN)  # the system's CAs do not know this API server
        with pytest.raises(KubeAPIError, match="did not answer: .*CERTIFICATE_VERIFY_FAILED") as caught:
            untrusting.get("Job", NAMESPACE, "j")
        assert caught.value.transient
    finally:
        fake.close()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(RuntimeError, match="KUBERNETES_SERVICE_HOST is not set"):
        KubeAPI.in_cluster(account_dir=account)
    with pytest.raises(ValueError, match="must be https://HOST:PORT"):
        KubeAPI("ftp://server")


def test_the_node_launcher_needs_its_index(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    with pytest.raises(SystemExit) as caught:
        cluster_node.main(["--log-dir", str(tmp_path), "--", sys.executable, "-c", "pass"])
    assert caught.value.code == 2
    assert "JOB_COMPLETION_INDEX must be set to the pod's index" in capsys.readouterr().err
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "4")
    code = cluster_node.main(
        ["--log-dir", str(tmp_path), "--", sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]
    )
    assert code == 128 + signal.SIGKILL
    assert json.loads((tmp_path / "node-4.json").read_text())["returncode"] == -signal.SIGKILL


# -- TrainingRuns with a cluster: each run a Job, followed and published as a local run -----------------------------
PINNED_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # one thread per process; gloo on the loopback


class Recorder:
    """The observer of a :class:`~cliptuner.serve.runs.TrainingRuns`: each event, with the runs' ``progress`` as it
    stood when the event came (before the event is folded in), and how each run ended."""

    def __init__(self) -> None:
        self.runs: Optional[runs.TrainingRuns] = None
        self.events: list[dict] = []
        self.progress: list[dict] = []
        self.finished: list[str] = []
        self.versions: list[Optional[str]] = []

    def training_event(self, event: dict) -> None:
        self.events.append(event)
        self.progress.append(dict(self.runs.progress))

    def training_finished(self, outcome: str) -> None:
        self.finished.append(outcome)

    def model_version(self, version: Optional[str]) -> None:
        self.versions.append(version)


@pytest.fixture
def registry(tmp_path, tiny_model_dir) -> Registry:
    """The workspace's registry, with the session's tiny model published as ``v1``."""
    registry = Registry(tmp_path / "workspace" / "models")
    registry.publish(tiny_model_dir)  # v1
    return registry


def cluster_runs(tmp_path: Path, fake: FakeKube, registry: Registry) -> tuple[runs.TrainingRuns, Recorder]:
    """TrainingRuns of the workspace whose runs are Jobs of two nodes on the fake API server, and its recorder."""
    recorder = Recorder()
    training = runs.TrainingRuns(
        tmp_path / "workspace" / "runs",
        registry,
        observer=recorder,
        cluster=cluster_of(tmp_path, extra_env=PINNED_ENV),
        kube_api=KubeAPI(fake.url, token=TOKEN),
    )
    recorder.runs = training
    return training, recorder


def stand_in_job(run: runs.Run) -> TrainJob:
    """A ``prepare`` for the stand-ins, which read only the job's ``out``."""
    run.sources = {"source": "request docs"}
    return TrainJob(data=str(run.inputs_dir / "train.csv"), out=str(run.model_dir))


def job_requests(fake: FakeKube, method: str, name: str) -> list[dict]:
    """The requests ``method`` the fake API server got for the Job ``name``."""
    return [r for r in fake.requests if r["method"] == method and r["path"].endswith(f"/jobs/{name}")]


def assert_nothing_published(training: runs.TrainingRuns, registry: Registry) -> None:
    """CURRENT and the registry as they were, the run's directory gone, the one run's place free again."""
    assert registry.current() == "v1" and registry.versions() == ["v1"]
    assert list(training.runs_dir.iterdir()) == []
    training.acquire()
    training.release()


@pytest.mark.parametrize(
    "mode, error_type, phases, cause",
    [
        (
            "crash",  # node 1 exits 3 without a word
            runs.TrainingFailed,
            {"loading", "evaluating"},  # wherever node 0's events had taken the run
            "; node 1 exited with code 3 first (then node 0 with 143) without reporting why; "
            "its log ends:\ntrain-1.log:\n",
        ),
        (
            "input",  # node 1 reports bad input as its failed event
            runs.TrainingInputError,
            {"loading"},
            "; node 1 exited with code 2 first (then node 0 with 143): "
            "image 'cat' (/nowhere/cat.png): cannot decode image",
        ),
    ],
    ids=["crash", "input"],
)
def test_a_failing_node_fails_the_run_with_its_job_and_node_named_and_publishes_nothing(
    tmp_path, registry, mode, error_type, phases, cause
):
    fake = make_fake(tmp_path, stand_in=stand_in(mode))
    training, recorder = cluster_runs(tmp_path, fake, registry)
    try:
        run, new = training.claim(f"request-{mode}")
        assert new
        with pytest.raises(runs.TrainingFailed) as caught:
            training.run(stand_in_job, run)
        error = caught.value
        assert type(error) is error_type and error.run_id == run.run_id and error.phase in phases
        assert isinstance(error.__cause__, runs.TrainingProcessError)
        name = job_name(run.run_id)
        message = str(error)
        assert message.startswith(f"/train run {run.run_id} failed while {error.phase}: ")
        assert f"training job {NAMESPACE}/{name} failed (BackoffLimitExceeded" in message
        assert cause in message and message.endswith("(nothing was published; CURRENT is still v1)")
        assert training.progress["state"] == "failed" and training.progress["run_id"] == run.run_id
        assert recorder.finished == ["failed"] and recorder.versions == []
        assert run.state == "failed"
        with pytest.raises(runs.TrainingFailed) as again:  # the request arriving again gets the same error
            training.claim(f"request-{mode}")[0].outcome(0)
        assert again.value is error
        # the failed Job is deleted (its pods first), and its Service with it
        assert [r["body"]["propagationPolicy"] for r in job_requests(fake, "DELETE", name)] == ["Foreground"]
        assert not fake.objects
        assert all(pod.poll() is not None for pods in fake.pods.values() for pod in pods)
        assert_nothing_published(training, registry)
    finally:
        training.close()
        fake.close()


def test_a_cancel_while_the_job_trains_deletes_the_job_and_publishes_nothing(tmp_path, registry):
    fake = make_fake(tmp_path, stand_in=stand_in("train"))
    training, recorder = cluster_runs(tmp_path, fake, registry)
    try:
        run, _ = training.claim("request-to-cancel")
        training.start_detached(stand_in_job, run)
        deadline = time.monotonic() + 60
        while not training.progress.get("step") and time.monotonic() < deadline:
            time.sleep(0.02)
        progress = training.progress
        assert progress.get("phase") == "training" and progress.get("step") == 1 and progress["run_id"] == run.run_id
        name = job_name(run.run_id)
        assert ("Job", NAMESPACE, name) in fake.objects and not job_requests(fake, "DELETE", name)

        assert training.cancel(run.run_id) is run
        assert run.finished.wait(60)
        with pytest.raises(
            runs.TrainingFailed, match=r"TrainingCancelled: the run was cancelled at epoch 1/3, step 1/30"
        ):
            run.outcome(0)
        assert run.state == "cancelled" and training.progress["state"] == "cancelled"
        assert recorder.finished == ["cancelled"] and recorder.versions == []
        assert [r["body"]["propagationPolicy"] for r in job_requests(fake, "DELETE", name)] == ["Foreground"]
        assert not fake.objects  # the Job, and the Service it owned
        assert all(pod.poll() is not None for pods in fake.pods.values() for pod in pods)  # its pods were stopped
        assert_nothing_published(training, registry)
    finally:
        training.close()
        fake.close()


# -- the real thing: two torchrun launchers, --nnodes 2, on 127.0.0.1 ----------------------------------------------
def test_two_torchrun_nodes_meet_through_c10d_rendezvous_train_and_export(tmp_path, run_dir):
    csv = synthetic.write_csv(run_dir / "inputs" / "data", n_images=24, domain="generic", seed=2)
    job = TrainJob(
        data=str(csv),
        out=str(run_dir / "model"),
        model=ModelSpec("cliptuner-tiny"),
        cfg=TrainConfig(device="cpu", epochs=1, batch_size=4, warmup_steps=1, seed=3),
        plots=False,
    )
    job.write(run_dir / "inputs" / "job.json")
    fake = make_fake(tmp_path)  # the Job's own command: the node launcher, then torchrun, then the worker
    cluster = cluster_of(tmp_path, extra_env={"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    try:
        run = job_run(fake, cluster, run_dir)
        assert run.job_command()[6:9] == ["python", "-m", "torch.distributed.run"]
        run.start()
        code, events = follow(run, timeout=600)
        assert code == 0, run.log_tail(40)
        loaded = next(e for e in events if e["event"] == "loaded")
        assert loaded["world_size"] == 2  # one process on each of the two nodes
        kinds = [e["event"] for e in events]
        assert {"before", "step", "epoch", "after"} <= set(kinds) and run.failed is None
        assert len({e["pid"] for e in events}) == 1  # rank 0 alone writes the events
        report = json.loads((run_dir / "model" / "report.json").read_text())
        assert report["world_size"] == 2 and set(report["after"]) >= {"t2i_r5", "i2t_r5"}
        assert (run_dir / "model" / "model.json").is_file() and (run_dir / "model" / "visual.onnx").is_file()
        for index in (0, 1):
            assert json.loads((run_dir / f"node-{index}.json").read_text())["returncode"] == 0
            assert "torch.distributed.run --nnodes 2" in (run_dir / f"train-{index}.log").read_text()
    finally:
        fake.close()
        shutil.rmtree(run_dir / "model", ignore_errors=True)


def test_a_torchrun_node_whose_peer_failed_is_stopped_and_the_failed_peer_is_quoted(tmp_path, run_dir):
    def node_1_fails(argv: list[str], index: int) -> list[str]:
        if index == 0:
            return argv  # the real torchrun, waiting for its peer in the rendezvous
        broken = "import sys; print('CUDA error: no CUDA-capable device is detected', file=sys.stderr); sys.exit(1)"
        return [*argv[: argv.index("--") + 1], sys.executable, "-c", broken]

    fake = make_fake(tmp_path, stand_in=node_1_fails)
    try:
        run = job_run(fake, cluster_of(tmp_path, extra_env={"OMP_NUM_THREADS": "1"}), run_dir)
        run.start()
        code, _ = follow(run, timeout=300)
        assert code == 1
        message = str(run.failure(code, lambda m: m))
        assert f"training job {NAMESPACE}/{job_name(RUN_ID)} failed (BackoffLimitExceeded" in message
        assert "node 1 exited with code 1" in message and message.endswith(
            "CUDA error: no CUDA-capable device is detected"
        )
        node_0 = json.loads((run_dir / "node-0.json").read_text())  # torchrun ended when its pod was stopped
        assert node_0["returncode"] != 0
        assert all(pod.poll() is not None for pods in fake.pods.values() for pod in pods)
    finally:
        fake.close()


def tiny_job(registry: Registry) -> runs.Prepare:
    """A ``prepare`` as the tuner's: the pairs written into the run's inputs, training from CURRENT's weights."""

    def prepare(run: runs.Run) -> TrainJob:
        manifest = registry.manifest(run.parent)
        checkpoint = manifest.checkpoint_path(registry.path(run.parent))
        assert checkpoint is not None
        run.init, run.sources = f"version {run.parent}", {"source": "request docs"}
        pairs = synthetic.write_csv(run.inputs_dir / "data", n_images=24, domain="generic", seed=2)
        return TrainJob(
            data=str(pairs),
            out=str(run.model_dir),
            model=ModelSpec(manifest.arch, pretrained=str(checkpoint), force_quick_gelu=manifest.force_quick_gelu),
            cfg=TrainConfig(device="cpu", epochs=1, batch_size=4, warmup_steps=1, seed=3),
            gate=GateConfig(gate=False),  # how the run publishes is under test here, not whether it is better
            plots=False,
        )

    return prepare


def test_training_runs_train_a_claimed_request_as_a_two_node_job_and_publish_it(tmp_path, registry):
    fake = make_fake(tmp_path)  # the Job's own command: the node launcher, torchrun --nnodes 2, the worker
    training, recorder = cluster_runs(tmp_path, fake, registry)
    try:
        run, new = training.claim("client-request-1")
        assert new and run.request_id == "client-request-1"
        report = training.run(tiny_job(registry), run)

        # published as a local run publishes: a new version, CURRENT moved, the report of the same shape
        assert report["model_version"] == "v2" and registry.current() == "v2" and registry.versions() == ["v1", "v2"]
        assert report["parent_version"] == "v1" and report["init"] == "version v1"
        assert report["request_id"] == "client-request-1" and report["world_size"] == 2
        recall = {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"}
        for when in ("before", "after"):
            assert set(report[when]) >= recall and all(0.0 <= report[when][k] <= 1.0 for k in recall)
        assert report["split"]["source"] == "request docs" and report["split"]["eval_images"] > 0
        manifest = registry.manifest("v2")
        assert manifest.parent_version == "v1" and manifest.report["after"] == report["after"]
        assert training.progress["state"] == "done" and training.progress["model_version"] == "v2"
        assert training.last_summary()["model_version"] == "v2"
        assert recorder.finished == ["published"] and recorder.versions == ["v2"]

        # progress followed rank 0's events (one writer, two nodes): through training, with its pid
        kinds = [e["event"] for e in recorder.events]
        assert kinds[0] == "loaded" and {"before", "step", "epoch", "after"} <= set(kinds) and "failed" not in kinds
        assert recorder.events[0]["world_size"] == 2
        (pid,) = {e["pid"] for e in recorder.events}
        assert recorder.progress[0]["pid"] is None  # no local process: the worker runs in the Job's pods
        assert all(p["pid"] == pid for p in recorder.progress[1:])
        assert all(p["run_id"] == run.run_id and p["request_id"] == "client-request-1" for p in recorder.progress)
        phases = [p["phase"] for p in recorder.progress]
        in_order = [phase for i, phase in enumerate(phases) if i == 0 or phase != phases[i - 1]]
        assert in_order == ["loading", "evaluating", "training", "evaluating"]  # before "after": evaluated again
        assert any(p["phase"] == "training" and p.get("step") for p in recorder.progress)

        # one Job of two indexed pods, then its Service; a finished Job is left to its TTL, not deleted
        name = job_name(run.run_id)
        created = [r["body"] for r in fake.requests if r["method"] == "POST"]
        assert [(obj["kind"], obj["metadata"]["name"]) for obj in created] == [("Job", name), ("Service", name)]
        spec = created[0]["spec"]
        assert spec["completions"] == spec["parallelism"] == 2 and spec["completionMode"] == "Indexed"
        assert spec["ttlSecondsAfterFinished"] == 3600
        env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
        assert env["OMP_NUM_THREADS"] == "1"
        assert not [r for r in fake.requests if r["method"] == "DELETE"]
        job = KubeAPI(fake.url, token=TOKEN).get("Job", NAMESPACE, name)
        assert job["status"]["succeeded"] == 2 and job["status"]["conditions"][0]["type"] == "Complete"
        assert ("Service", NAMESPACE, name) in fake.objects

        # the run directory keeps its report and the nodes' logs; the inputs and the export have gone
        assert json.loads((run.run_dir / runs.REPORT_FILE).read_text()) == json.loads(json.dumps(report))
        for gone in (runs.INPUTS_SUBDIR, runs.MODEL_SUBDIR, runs.EVENTS_FILE, PROCESS_FILE):
            assert not (run.run_dir / gone).exists()
        for index in (0, 1):
            assert json.loads((run.run_dir / f"node-{index}.json").read_text())["returncode"] == 0
            assert "torch.distributed.run --nnodes 2" in (run.run_dir / f"train-{index}.log").read_text()

        # the request arriving again gets the run that published for it, not a second run
        again, new = training.claim("client-request-1")
        assert again is run and not new and again.outcome(0) is report
        assert len(fake.pods) == 1
    finally:
        training.close()
        fake.close()


# -- the tuner's train_cluster setting ------------------------------------------------------------------------------
@pytest.fixture
def tuner_module(tmp_path, monkeypatch):
    """:mod:`executors.tuner`, reading "this pod's" namespace from ``tmp_path/serviceaccount`` (missing: not a pod)."""
    from executors import tuner

    account = tmp_path / "serviceaccount"
    monkeypatch.setattr(tuner, "in_cluster_namespace", lambda: in_cluster_namespace(account))
    return tuner


def test_train_cluster_refuses_a_non_mapping_and_unknown_or_bad_fields_by_name(tuner_module):
    for bad in ("image=x:1,nodes=2", ["image", "nodes"], 3):
        with pytest.raises(ValueError, match=r"train_cluster must be a mapping of TrainingCluster fields, got "):
            tuner_module.training_cluster(bad)
    with pytest.raises(ValueError, match=r"train_cluster: unknown field\(s\) \['colour', 'node'\]; known: \[.*'nodes'"):
        tuner_module.training_cluster({"image": "x:1", "node": 2, "colour": "red", "namespace": "ml"})
    assert tuner_module.training_cluster(None) is None and tuner_module.training_cluster({}) is None  # local runs


def test_train_cluster_with_its_namespace_given_builds_the_cluster_or_names_a_bad_value(tuner_module):
    values = {
        "image": "registry.example.com/cliptuner-tuner:1.2",
        "nodes": 2,
        "namespace": "ml",  # given: this process is in no pod, and need not be
        "gpus_per_node": 1,
        "extra_env": {"NCCL_DEBUG": "WARN"},
    }
    given = copy.deepcopy(values)
    cluster = tuner_module.training_cluster(values)
    assert cluster == TrainingCluster(**values) and cluster.namespace == "ml" and cluster.nodes == 2
    assert values == given  # the setting itself is not changed
    with pytest.raises(ValueError, match="nodes must be an integer >= 1, got 0"):
        tuner_module.training_cluster({**values, "nodes": 0})


def test_train_cluster_without_a_namespace_takes_the_pods_and_outside_a_pod_says_it_cannot(tuner_module, tmp_path):
    account = tmp_path / "serviceaccount"
    with pytest.raises(
        RuntimeError, match=rf"cannot read this pod's namespace from {re.escape(str(account / 'namespace'))}: "
    ):
        tuner_module.training_cluster({"image": "x:1", "nodes": 2})
    account.mkdir()
    (account / "namespace").write_text("ml\n")
    assert tuner_module.training_cluster({"image": "x:1", "nodes": 2}).namespace == "ml"
