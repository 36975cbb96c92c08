"""/search latency while a /train runs vs idle, on the same Flow in one run; and the peak memory of each process.

Starts `cliptuner serve` (flows/flow.yml) on 127.0.0.1 with a fresh workspace whose base model is ``--model``
(random init: no download), indexes ``--gallery`` synthetic scenes as PNG blobs, then sends ``--queries`` text
queries to ``/search`` one at a time (each waits for its answer; ``--limit`` matches) in three phases:

1. ``idle``: nothing else runs (the baseline);
2. ``training``: a ``/train`` with ``wait=False`` on a PAIRS file of ``--train-images`` synthetic domain scenes
   (two captions each) under the workspace's data root, ``--epochs`` epochs (far more than the measurement
   needs: it is cancelled afterwards); the queries start once ``/status`` shows the training process past its
   first optimizer step (training, not loading), and the run must still be training when they end. They are
   sent in ``--blocks`` blocks that alternate with as many blocks of ``paused``: the same queries while the
   training process group is stopped (SIGSTOP, then SIGCONT), an idle baseline measured side by side under
   the same outside load;
3. ``after``: idle again, once the run has been cancelled (``--no-after`` leaves it out): shows the drift of the
   machine's load across the run.

The ratio is p50 during training ÷ p50 idle (the target on a 2-core machine: ≤ 3×); ``ratio_paused`` divides by
the interleaved ``paused`` p50 instead, which is the steadier figure on a machine that other jobs share. The same
queries, in the same order, are sent in every phase.

Thread settings: the Flow runs with ``OMP_NUM_THREADS=--threads`` (the service's environment); the training
process gets the tuner's settings: ``--torch-threads`` (``CLIPTUNER_TORCH_THREADS``, its ``OMP_NUM_THREADS``) and
``--niceness`` (``CLIPTUNER_TRAIN_NICENESS``, its CPU priority), each left to the tuner's default when not given.
What the training process really ran with is read back from /proc (``settings.observed``).
The settings before the tuner lowered the training process's priority are ``--niceness 0 --torch-threads 2``.

Memory: the peak resident set (``VmHWM`` in ``/proc/<pid>/status``) of each process of the Flow, sampled every
``--sample-s`` seconds while the benchmark runs: ``serve`` (the `cliptuner serve` process that holds the Flow),
``gateway`` (holds the listening socket of the Flow's port), ``tuner`` (its pid in ``/status``), ``indexer`` (holds
files of ``<workspace>/index`` open), ``encoder`` (the remaining Executor process) and ``training`` (the
training process in ``/status``, and its own children, if any, as ``training-child-N``).

    python benchmarks/train_load.py                                   # full: 512 images, 200 queries a phase
    python benchmarks/train_load.py --gallery 64 --queries 40 --train-images 128 --no-after      # quick
    python benchmarks/train_load.py --niceness 0 --torch-threads 2    # the settings before, for comparison

Returns (and writes to ``--json``): ``idle``, ``training``, ``paused``, ``after`` (``p50_ms``, ``p99_ms``,
``mean_ms``, ``n``), ``ratio`` (training p50 / idle p50), ``ratio_paused`` (training p50 / paused p50),
``ratio_after`` (after p50 / idle p50, None without it), ``memory_mb``
({process: peak MB}), ``process_threads`` ({process: threads at the end}), ``training_progress`` (``cpus_used``: CPU
seconds the training process used per second of the training blocks; optimizer steps during the measurement;
the run's own samples/s, paused time included), ``settings`` (requested and observed thread settings), and
``machine``, ``python``, ``versions``, ``threads``, ``wall_s``, ``command``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))


# -- /proc: the Flow's process tree and what each process holds ------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:  # the process is gone
        return ""


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's ``children`` file)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        out += [int(c) for c in _read(f"/proc/{pid}/task/{task}/children").split()]
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents before children."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        out.append(current)
        todo += children(current)
    return out


def status_field(pid: int, field: str) -> Optional[int]:
    """A numeric field of ``/proc/<pid>/status`` (``VmHWM`` in kB, ``Threads``), None when gone."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()


def niceness(pid: int) -> Optional[int]:
    """The nice value of ``pid`` (field 19 of ``/proc/<pid>/stat``)."""
    stat = _read(f"/proc/{pid}/stat")
    return int(stat[stat.rindex(")") + 2 :].split()[16]) if stat else None


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid``, all its threads, and of its descendants still running."""
    total = 0
    for member in tree(pid):
        stat = _read(f"/proc/{member}/stat")
        if stat:
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


def environ(pid: int) -> dict[str, str]:
    return dict(item.split("=", 1) for item in _read(f"/proc/{pid}/environ").split("\0") if "=" in item)


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _read(table).splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def open_files(pid: int) -> list[str]:
    """What the file descriptors of ``pid`` point to (``socket:[inode]`` for sockets)."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


class MemorySampler:
    """Samples the peak RSS (``VmHWM``) of every process under ``root`` in a thread, so that a process that ends
    (the training process) keeps its last reading."""

    def __init__(self, root: int, every_s: float) -> None:
        self.root = root
        self.every_s = every_s
        self.peak_kb: dict[int, int] = {}
        self.threads: dict[int, int] = {}
        self.commands: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        for pid in tree(self.root):
            hwm, threads = status_field(pid, "VmHWM"), status_field(pid, "Threads")
            if hwm is None:
                continue
            self.peak_kb[pid] = max(hwm, self.peak_kb.get(pid, 0))
            self.threads[pid] = threads or 0
            self.commands.setdefault(pid, cmdline(pid))

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def identify(
    root: int, port: int, workspace: Path, tuner_pid: Optional[int], training_pid: Optional[int]
) -> dict[int, str]:
    """Name the processes of the Flow rooted at ``root`` (see the module docstring)."""
    names = {root: "serve"}
    listening = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    index_dir = str(workspace / "index")
    pods = [pid for pid in children(root) if "resource_tracker" not in cmdline(pid)]
    for pid in pods:
        files = open_files(pid)
        if pid == tuner_pid:
            names[pid] = "tuner"
        elif listening & set(files):
            names[pid] = "gateway"
        elif any(f.startswith(index_dir) for f in files):
            names[pid] = "indexer"
    rest = [pid for pid in pods if pid not in names]
    for pid in rest:
        names[pid] = "encoder" if len(rest) == 1 else f"process-{pid}"
    if training_pid is not None:
        names[training_pid] = "training"
        for i, pid in enumerate(tree(training_pid)[1:]):
            names[pid] = f"training-child-{i}"
    return names


# -- the measurement --------------------------------------------------------------------------------------------------
def percentiles(seconds: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "n": len(seconds),
    }


def wait_for(condition: Callable[[], Optional[dict]], timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="cliptuner-tiny", help="base model of the served workspace (random init)")
    p.add_argument("--gallery", type=int, default=512, help="synthetic scenes indexed before searching")
    p.add_argument("--queries", type=int, default=200, help="text queries per phase, one request each")
    p.add_argument("--warmup", type=int, default=10, help="queries sent before each phase, not counted")
    p.add_argument(
        "--blocks",
        type=int,
        default=5,
        help="blocks of the training phase, each followed by a block with the training paused",
    )
    p.add_argument("--limit", type=int, default=10, help="matches per query")
    p.add_argument("--train-images", type=int, default=256, help="images of the PAIRS file trained on")
    p.add_argument("--epochs", type=int, default=1000, help="epochs of the /train (it is cancelled when measured)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the /train")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the Flow's processes")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CLIPTUNER_TORCH_THREADS: threads of the training process (default: the tuner's)",
    )
    p.add_argument(
        "--niceness",
        type=int,
        default=None,
        help="CLIPTUNER_TRAIN_NICENESS: nice value of the training process (default: the tuner's)",
    )
    p.add_argument("--no-after", dest="after", action="store_false", help="skip the idle phase after training")
    p.add_argument("--sample-s", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def service_env(args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """The service's environment: ``(variables set, variables it must not inherit)``; the tuner's training
    settings are set only when asked for, else left to the tuner's defaults."""
    env = {"CLIPTUNER_MODEL": args.model, "OMP_NUM_THREADS": str(args.threads)}
    if args.torch_threads is not None:
        env["CLIPTUNER_TORCH_THREADS"] = str(args.torch_threads)
    if args.niceness is not None:
        env["CLIPTUNER_TRAIN_NICENESS"] = str(args.niceness)
    unset = [name for name in ("CLIPTUNER_TORCH_THREADS", "CLIPTUNER_TRAIN_NICENESS") if name not in env]
    return env, unset


class FlowClient:
    """What the benchmark sends the Flow: the gallery to index, timed text queries, a /train and /status."""

    def __init__(self, client, texts: list[str], limit: int, gallery_size: int) -> None:
        from docarray import DocList

        from executors.schemas import ClipDoc

        self.docs, self.doc = DocList[ClipDoc], ClipDoc
        self.client = client
        self.texts = texts
        self.limit = limit
        self.gallery_size = gallery_size

    def post(self, on: str, docs=None, **kwargs):
        return self.client.post(on, inputs=docs, return_type=self.docs, **kwargs)

    def status(self) -> dict:
        return {doc.id: doc.tags for doc in self.post("/status")}

    def training_state(self) -> dict:
        return self.status()["status-tuner"]["training"]

    def index(self, gallery) -> None:
        """Index the gallery's scenes as PNG blobs, 64 a request."""
        from service import png

        for start in range(0, self.gallery_size, 64):
            self.post(
                "/index",
                self.docs(
                    [
                        self.doc(id=gallery.image_ids[i], blob=png(gallery.images[i]))
                        for i in range(start, min(start + 64, self.gallery_size))
                    ]
                ),
            )

    def searches(self, indices) -> list[float]:
        """Send the text queries ``indices`` one at a time; the seconds each took."""
        seconds = []
        for i in indices:
            query = self.docs([self.doc(id=f"q{i}", text=self.texts[i])])
            t0 = time.perf_counter()
            answer = self.post("/search", query, parameters={"limit": self.limit})
            seconds.append(time.perf_counter() - t0)
            if len(answer[0].matches) != min(self.limit, self.gallery_size):
                raise RuntimeError(f"query {i} got {len(answer[0].matches)} matches")
        return seconds

    def start_training(self, epochs: int, batch_size: int) -> str:
        """A ``/train`` with ``wait=False`` on the workspace's PAIRS file; its run id."""
        return self.post(
            "/train",
            parameters={
                "data": "train/pairs.csv",
                "wait": False,
                "epochs": epochs,
                "batch_size": batch_size,
                "seed": 0,
                "eval_fraction": 0.2,
            },
        )[0].tags["run_id"]


def training_and_paused(
    client: FlowClient, warmup: range, blocks: list[range], training_pid: int
) -> tuple[list[float], list[float], float, float]:
    """Each block of queries while the training runs, then again with its process group stopped;
    ``(seconds during training, seconds paused, CPU seconds the training used, wall seconds of those blocks)``."""
    group = os.getpgid(training_pid)
    client.searches(warmup)
    during, paused = [], []
    busy_s = wall_s = 0.0  # CPU time the training used during the training blocks, and their wall time
    try:
        for block in blocks:
            cpu0, t0 = cpu_seconds(training_pid), time.perf_counter()
            during += client.searches(block)
            busy_s += cpu_seconds(training_pid) - cpu0
            wall_s += time.perf_counter() - t0
            os.killpg(group, signal.SIGSTOP)
            paused += client.searches(block)
            os.killpg(group, signal.SIGCONT)
    finally:
        os.killpg(group, signal.SIGCONT)
    return during, paused, busy_s, wall_s


def measure(args: argparse.Namespace, client: FlowClient, flow, sampler: MemorySampler, workspace: Path) -> dict:
    """The three phases (idle, training with paused blocks, after), the training's progress and settings, and
    the names of the Flow's processes."""
    warmup, counted = range(args.warmup), range(args.warmup, len(client.texts))
    blocks = [counted[b :: args.blocks] for b in range(args.blocks)]  # each block: every query once, in all
    client.searches(warmup)
    idle = percentiles(client.searches(counted))
    run_id = client.start_training(args.epochs, args.batch_size)
    before = wait_for(
        lambda: (lambda t: t if t.get("step") and t.get("phase") == "training" else None)(client.training_state()),
        600,
        "the training process's first optimizer step",
    )
    training_pid = int(before["pid"])
    observed = {
        "train_niceness": niceness(training_pid),
        "train_omp_num_threads": environ(training_pid).get("OMP_NUM_THREADS"),
        "train_threads_total": status_field(training_pid, "Threads"),
    }
    during, paused, busy_s, wall_s = training_and_paused(client, warmup, blocks, training_pid)
    during, paused = percentiles(during), percentiles(paused)
    end = client.training_state()
    if end.get("state") != "running" or end.get("phase") != "training":
        raise RuntimeError(f"the run stopped training before the measurement ended: {end}; raise --epochs")
    tuner_pid = int(client.status()["status-tuner"]["pid"])
    sampler.sample()
    names = identify(flow.proc.pid, flow.port, workspace, tuner_pid, training_pid)
    steps = int(end["step"]) - int(before["step"])  # optimizer steps since the start (not per epoch)
    progress = {
        "steps_during_measurement": steps,
        "cpus_used": round(busy_s / wall_s, 2),
        "samples_per_s": end.get("samples_per_s"),
        "epoch": end.get("epoch"),
        "step": end.get("step"),
        "total_steps": end.get("total_steps"),
    }
    client.post("/train/cancel", parameters={"run_id": run_id})
    if args.after:
        client.searches(warmup)
        after = percentiles(client.searches(counted))
    else:
        after = None
    phases = {"idle": idle, "training": during, "paused": paused, "after": after}
    return {"phases": phases, "observed": observed, "progress": progress, "names": names, "steps": steps}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("JINA_HIDE_SURVEY", "1")
    os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")
    from service import FlowProcess

    from cliptuner.train import synthetic
    from executors.tuner import write_pairs_csv

    env, unset = service_env(args)
    tmp = Path(tempfile.mkdtemp(prefix="cliptuner-bench-"))
    workspace = tmp / "ws"
    pairs = synthetic.generate(args.train_images, "domain", seed=1, captions_per_image=2)
    write_pairs_csv(pairs, workspace / "data" / "train" / "pairs.csv")
    gallery = synthetic.generate(args.gallery, "generic", seed=0)
    texts = synthetic.generate(args.queries + args.warmup, "generic", seed=2).captions[: args.queries + args.warmup]
    flow = FlowProcess(workspace, tmp / "flow.log", env=env, unset=unset)
    flow.start()
    sampler = MemorySampler(flow.proc.pid, args.sample_s)
    sampler.start()
    failed = True
    try:
        client = FlowClient(flow.client(), texts, args.limit, args.gallery)
        client.index(gallery)
        measured = measure(args, client, flow, sampler, workspace)
        failed = False
    finally:
        sampler.stop()
        flow.stop()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)  # kept when the run failed: flow.log is there
        else:
            print(f"failed; the Flow's log: {tmp / 'flow.log'}", file=sys.stderr)
    result = report(args, argv, measured, sampler, started)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def report(args: argparse.Namespace, argv, measured: dict, sampler: MemorySampler, started: float) -> dict:
    """The results (see the module docstring), printed as tables."""
    import jina
    import onnxruntime
    import torch

    memory = {}
    threads = {}
    for pid, name in sorted(measured["names"].items(), key=lambda item: item[1]):
        if pid in sampler.peak_kb:
            memory[name] = round(sampler.peak_kb[pid] / 1024, 1)
            threads[name] = sampler.threads[pid]
    phases, observed, progress = measured["phases"], measured["observed"], measured["progress"]
    idle, during, paused, after = phases["idle"], phases["training"], phases["paused"], phases["after"]
    result = {
        "model": args.model,
        "gallery": args.gallery,
        "queries": args.queries,
        "limit": args.limit,
        "train_images": args.train_images,
        "batch_size": args.batch_size,
        "idle": idle,
        "training": during,
        "paused": paused,
        "after": after,
        "ratio": round(during["p50_ms"] / idle["p50_ms"], 2),
        "ratio_paused": round(during["p50_ms"] / paused["p50_ms"], 2),
        "ratio_after": round(after["p50_ms"] / idle["p50_ms"], 2) if after else None,
        "training_progress": progress,
        "memory_mb": memory,
        "process_threads": threads,
        "settings": {
            "flow_omp_num_threads": args.threads,
            "requested_torch_threads": args.torch_threads,
            "requested_niceness": args.niceness,
            "encoder_intra_op_threads": "ONNX Runtime default",
            "observed": observed,
            "cpus": len(os.sched_getaffinity(0)),
        },
        "threads": args.threads,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "versions": {"jina": jina.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "wall_s": round(time.perf_counter() - started, 1),
        "command": "python benchmarks/train_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print_tables(args, result, measured["steps"])
    return result


def print_tables(args: argparse.Namespace, result: dict, steps: int) -> None:
    observed = result["settings"]["observed"]
    print(
        f"/search latency, {args.model}, {args.gallery} docs indexed, {args.queries} text queries a phase; "
        f"training process: nice {observed['train_niceness']}, OMP_NUM_THREADS "
        f"{observed['train_omp_num_threads']}; Flow OMP_NUM_THREADS {args.threads}\n"
    )
    print("| phase | p50 ms | p99 ms | mean ms | n |\n|---|---|---|---|---|")
    for phase in ("idle", "training", "paused", "after"):
        row = result[phase]
        if row:
            print(f"| {phase} | {row['p50_ms']} | {row['p99_ms']} | {row['mean_ms']} | {row['n']} |")
    print(
        f"\nratio p50 training / idle: **{result['ratio']}** (training / paused: {result['ratio_paused']}; "
        f"after / idle: {result['ratio_after']}); "
        f"the training process used {result['training_progress']['cpus_used']} CPUs while the queries ran ({steps} "
        f"optimizer steps during the measurement)\n"
    )
    print("| process | peak RSS MB | threads |\n|---|---|---|")
    for name, mb in result["memory_mb"].items():
        print(f"| {name} | {mb} | {result['process_threads'][name]} |")


if __name__ == "__main__":
    main()
