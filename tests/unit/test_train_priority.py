"""The training process runs at the tuner's ``train_niceness`` (a lower CPU priority than serving) with
``torch_threads`` threads, so that a /train leaves the encoder and the indexer the CPU they need; bad settings are
refused by name, whether given to the tuner or through ``$CLIPTUNER_TORCH_THREADS`` / ``$CLIPTUNER_TRAIN_NICENESS``.
"""

import os
import time

import pytest
from docarray import DocList
from support import QUICK, pair_docs, run

from cliptuner.serve.runs import DEFAULT_TRAIN_NICENESS, MAX_NICENESS, default_torch_threads
from executors import ClipDoc
from executors.tuner import TORCH_THREADS_ENV, TRAIN_NICENESS_ENV

LONG = {**QUICK, "epochs": 40.0}  # still training when it is looked at, then cancelled


def training_steps(tuner, timeout: float = 300.0) -> dict:
    """Wait until the run reports optimizer steps (its threads are up by then); its /status ``training`` then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        training = tuner.status()["training"]
        if training.get("state") == "running" and training.get("step"):
            return training
        time.sleep(0.05)
    pytest.fail("the run reported no optimizer step in time")


def thread_niceness(pid: int) -> dict[int, int]:
    """The nice value of every thread of ``pid`` (field 19 of ``/proc/<pid>/task/<tid>/stat``)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            stat = fh.read()
        out[int(tid)] = int(stat[stat.rindex(")") + 2 :].split()[16])
    return out


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        items = fh.read().decode(errors="replace").split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(TORCH_THREADS_ENV, raising=False)
    monkeypatch.delenv(TRAIN_NICENESS_ENV, raising=False)
    return monkeypatch


@pytest.mark.parametrize("nice_program", [True, False], ids=["nice", "setpriority"])
def test_the_training_process_runs_at_the_set_priority_with_the_set_threads(workspace, clean_env, nice_program):
    from cliptuner.serve import runs as runs_module
    from executors import CLIPTuner

    if not nice_program:  # a system without the `nice` program: the tuner sets the child's priority itself
        clean_env.setattr(runs_module, "NICE", None)
    elif runs_module.NICE is None:
        pytest.skip("no `nice` program on this system")

    own = os.getpriority(os.PRIO_PROCESS, 0)
    niceness = min(7, MAX_NICENESS - own)  # not the default: the setting is what the child gets
    tuner = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", torch_threads=1, train_niceness=niceness)
    try:
        out = run(tuner.train(docs=pair_docs(24, seed=2), parameters={**LONG, "wait": False}))
        progress = training_steps(tuner)  # the child is past its first optimizer step: torch's threads exist
        pid = progress["pid"]
        assert pid != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, pid) == own + niceness
        niceness_of_threads = thread_niceness(pid)
        assert set(niceness_of_threads.values()) == {own + niceness}, niceness_of_threads
        assert environ(pid)["OMP_NUM_THREADS"] == "1"
        assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the tuner itself serves at its own priority
        status = tuner.status()
        assert status["torch_threads"] == 1 and status["train_niceness"] == niceness
        run(tuner.cancel(docs=DocList[ClipDoc](), parameters={"run_id": out[0].tags["run_id"]}))
    finally:
        tuner.close()


def test_defaults_leave_a_cpu_to_serving_and_lower_the_training_priority(workspace, clean_env):
    from executors import CLIPTuner

    assert [default_torch_threads(1, cpus) for cpus in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert [default_torch_threads(4, cpus) for cpus in (2, 9, 16)] == [1, 2, 3]  # per process under torchrun
    tuner = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu")
    try:
        assert tuner.train_niceness == DEFAULT_TRAIN_NICENESS == 10
        assert tuner.torch_threads == default_torch_threads(1, len(os.sched_getaffinity(0)))
        assert tuner.runs.worker_env()["OMP_NUM_THREADS"] == str(tuner.torch_threads)
    finally:
        tuner.close()


def test_the_environment_sets_what_the_settings_leave_unset(workspace, clean_env):
    from executors import CLIPTuner

    clean_env.setenv(TORCH_THREADS_ENV, "3")
    clean_env.setenv(TRAIN_NICENESS_ENV, "0")
    from_env = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu")
    given = CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", torch_threads=2, train_niceness=5)
    try:
        assert (from_env.torch_threads, from_env.train_niceness) == (3, 0)
        assert from_env.runs.worker_env()["OMP_NUM_THREADS"] == "3"
        assert (given.torch_threads, given.train_niceness) == (2, 5)  # a setting given wins over the variable
    finally:
        from_env.close()
        given.close()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"torch_threads": 0}, "parameter 'torch_threads' must be >= 1, got 0"),
        ({"torch_threads": 1.5}, "parameter 'torch_threads' must be a whole number, got 1.5"),
        ({"torch_threads": "many"}, "torch_threads must be an integer, got 'many'"),
        ({"train_niceness": -1}, r"parameter 'train_niceness' must be in \[0, 19\], got -1"),
        ({"train_niceness": 20}, r"parameter 'train_niceness' must be in \[0, 19\], got 20"),
        ({"train_niceness": True}, "parameter 'train_niceness' must be an integer, got True"),
    ],
)
def test_bad_settings_are_refused_by_name(workspace, clean_env, settings, message):
    from executors import CLIPTuner

    with pytest.raises(ValueError, match=message):
        CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu", **settings)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        (TORCH_THREADS_ENV, "two", "CLIPTUNER_TORCH_THREADS must be an integer, got 'two'"),
        (TORCH_THREADS_ENV, "0", r"parameter 'torch_threads' must be >= 1, got 0 \(from CLIPTUNER_TORCH_THREADS\)"),
        (
            TRAIN_NICENESS_ENV,
            "-5",
            r"parameter 'train_niceness' must be in \[0, 19\], got -5 \(from CLIPTUNER_TRAIN_NICENESS\)",
        ),
    ],
)
def test_bad_variables_are_refused_by_name(workspace, clean_env, variable, value, message):
    from executors import CLIPTuner

    clean_env.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        CLIPTuner(workspace=str(workspace), bootstrap=False, device="cpu")
