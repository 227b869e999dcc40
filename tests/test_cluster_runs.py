"""Searches on real two-node Ray clusters on this machine: the SLURM script
(`ray start --head`, `ray start --address`, `daae tune --address`), `ray job
submit`, and a search whose worker node is killed while its trial runs."""
import contextlib
import csv
import importlib.util
import json
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SMOKE = ROOT / "configs" / "tune" / "smoke.yaml"
BIN = Path(sys.executable).parent

log = logging.getLogger(__name__)

# The smoke search, shorter: two trials of one CPU each. With one CPU per node,
# each node runs one of them at a time, so both nodes get a trial.
QUICK = ["num_samples=2", "scheduler.kind=none", "overrides.train.max_steps=40",
         "overrides.eval.probe_train_size=500", "overrides.eval.probe_epochs=1"]
# Each node on its own loopback address: the node_ip that Ray records in
# every trial result then tells the nodes apart.
WORKER_IP = "127.0.0.2"


def free_port() -> int:
    """A port free now and below the kernel's ephemeral range: a port from
    bind(0) lies inside it, where the processes Ray starts meanwhile (each
    bind(0) and outgoing connection) may take it before Ray binds it. Above
    Ray's default worker ports (10002-19999)."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral_low = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    candidates = range(20000, ephemeral_low)
    for port in random.Random().sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000-{ephemeral_low}")


def ray_home() -> Path:
    """A short folder for RAY_TMPDIR (Ray's Unix socket paths live under it)
    and HOME (so Ray's session files and auth token stay out of the real one)."""
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    (root / "home").mkdir()
    return root


def head_address() -> str:
    """The address Ray gives a head node on this machine, as `ray start` would."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if (p / "params.json").is_file())


def results(trial: Path) -> list[dict]:
    path = trial / "result.json"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line, half written while the search runs
            break
    return rows


def finished_search(experiment: Path, trials: int) -> dict[str, list[dict]]:
    """Every trial finished; returns each trial's reports."""
    with open(experiment / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == trials and {r["status"] for r in rows} == {"finished"}, rows
    reports = {t.name: results(t) for t in trial_dirs(experiment)}
    for name, rs in reports.items():
        assert rs[-1]["final"], name
        # The trainer's TensorBoard files landed in the shared storage too.
        assert list((experiment / name).glob("events.out.tfevents.*")), name
    return reports


def where(reports: dict, head_ip: str) -> str:
    """Which node reported what, for the log (the closing note of a run)."""
    nodes = {head_ip: "head", WORKER_IP: "worker"}
    return "; ".join(f"{name}: " + ", ".join(
        f"step {r['step']} on {nodes.get(r['node_ip'], r['node_ip'])}" for r in rs)
        for name, rs in reports.items())


def run(command: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    log.info("%s: rc %d in %.1fs", shlex.join(map(str, command)), done.returncode,
             time.monotonic() - started)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return done


# SLURM stand-ins: every node of the "allocation" is this machine, and each
# `ray start` gets what a node of its own would have (FAKE_RAY_ARGS_<node>:
# its own address, ports nobody else uses). srun records the pid it becomes,
# so that the test can tell whether the script stopped its Ray nodes.
FAKE_SRUN = """#!/bin/bash
node=
while [[ ${1:-} == -* ]]; do
    case $1 in
        -w|--nodelist) node=$2; shift 2 ;;
        --nodelist=*) node=${1#*=}; shift ;;
        -N|-n|--nodes|--ntasks) shift 2 ;;
        *) shift ;;
    esac
done
echo $$ >> "$FAKE_SLURM_PIDS"
if [[ ${1:-} == ray && ${2:-} == start ]]; then
    var=FAKE_RAY_ARGS_$node
    read -r -a more <<< "${!var:-}"
    exec "$@" "${more[@]}"
fi
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] || exit 1
printf '%s\\n' $FAKE_SLURM_NODES
"""


def fake_commands(folder: Path, **scripts: str) -> Path:
    """``folder`` holding an executable script per name, to put first on PATH."""
    folder.mkdir()
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def alive_ray_processes(pids: list[int], root: Path) -> list[int]:
    """Those of ``pids`` still running as Ray processes of this test (their
    environment names its RAY_TMPDIR): a finished pid may have been reused."""
    alive = []
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"RAY_TMPDIR={root}".encode() in environ.split(b"\0"):
            alive.append(pid)
    return alive


@pytest.mark.slow
def test_slurm_script_runs_the_search_on_a_head_and_a_worker_node(tmp_path):
    """cluster/slurm/tune.sbatch as SLURM runs it on a two-node allocation,
    with srun and scontrol standing in: `ray start --head`, `ray start
    --address` on the other node, then `daae tune --address` over both."""
    fake = fake_commands(tmp_path / "bin", srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    root = ray_home()
    head_ip, port = head_address(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=str(root), HOME=str(root / "home"), PATH=f"{fake}{os.pathsep}{env['PATH']}",
        SLURM_JOB_NODELIST="node[0-1]", SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="1",
        FAKE_SLURM_NODES="node0 node1", FAKE_SLURM_PIDS=str(root / "pids"),
        DAAE_VENV=str(BIN.parent), RAY_PORT=str(port), RAY_HEAD_IP=head_ip,
        RAY_NODE_TIMEOUT="120",
        FAKE_RAY_ARGS_node0=f"--ray-client-server-port={free_port()} "
                            f"--dashboard-agent-listen-port={free_port()}",
        FAKE_RAY_ARGS_node1=f"--node-ip-address={WORKER_IP} "
                            f"--dashboard-agent-listen-port={free_port()}")
    pids = []
    try:
        done = run(["bash", CLUSTER / "slurm" / "tune.sbatch", "configs/tune/smoke.yaml",
                    f"storage_path={tmp_path}", *QUICK], timeout=300, env=env, cwd=tmp_path)
        pids = [int(p) for p in (root / "pids").read_text().split()]
        assert len(pids) == 2  # one srun step per node
        assert f"Ray cluster at {head_ip}:{port}: 2 nodes" in done.stdout
        reports = finished_search(tmp_path / "smoke", trials=2)
        log.info("SLURM script (daae tune --address): %s", where(reports, head_ip))
        assert {r["node_ip"] for rs in reports.values() for r in rs} == {head_ip, WORKER_IP}
        # The script stopped both Ray nodes when it ended.
        deadline = time.monotonic() + 30
        while alive_ray_processes(pids, root) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive_ray_processes(pids, root)
    finally:
        if (root / "pids").is_file():
            pids = [int(p) for p in (root / "pids").read_text().split()]
        for pid in alive_ray_processes(pids, root):
            # `ray start --block` leads its own process group: its node's processes.
            # A node may finish stopping between the check and the kill; that must
            # neither hide the test's own error nor spare the other node.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_slurm_script_ends_when_a_ray_node_will_not_stop(tmp_path):
    """A head that never answers fails the job; a Ray node that ignores the
    stop signal is killed after RAY_STOP_TIMEOUT rather than holding the
    allocation until its time limit."""
    stubborn_srun = ('#!/bin/bash\necho $$ >> "$FAKE_SLURM_PIDS"\n'
                     "trap '' TERM\nexec sleep 300\n")
    fake = fake_commands(tmp_path / "bin", srun=stubborn_srun, scontrol=FAKE_SCONTROL,
                         ray="#!/bin/bash\nexit 1\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", DAAE_VENV=str(tmp_path / "no_venv"),
               SLURM_JOB_NODELIST="node[0-1]", FAKE_SLURM_NODES="node0 node1",
               FAKE_SLURM_PIDS=str(tmp_path / "pids"), RAY_HEAD_IP="127.0.0.1",
               RAY_NODE_TIMEOUT="1", RAY_STOP_TIMEOUT="2")
    started = time.monotonic()
    done = subprocess.run(["bash", CLUSTER / "slurm" / "tune.sbatch", "configs/tune/smoke.yaml"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 1 and "the Ray head did not come up" in done.stderr
    assert time.monotonic() - started < 60
    (pid,) = map(int, (tmp_path / "pids").read_text().split())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# Node deaths must show within seconds rather than Ray's default ~30 s.
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a worker node, each its own raylet with one CPU, sharing this
    machine's file system (a cluster's shared storage), the worker on its own
    address and with its own Ray temp folder. ray.cluster_utils.Cluster owns
    every process it starts, so teardown touches no other Ray on this machine."""
    from ray.cluster_utils import Cluster

    root = ray_home()
    # `ray job submit` talks to the dashboard, which comes with ray[default].
    dashboard = importlib.util.find_spec("aiohttp") is not None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(root))
        patch.setenv("HOME", str(root / "home"))
        patch.delenv("RAY_ADDRESS", raising=False)
        # Jobs' entrypoints run with the nodes' environment: `daae` on PATH.
        patch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        head_args = {"num_cpus": 1, "include_dashboard": dashboard,
                     "dashboard_agent_listen_port": free_port(),
                     "_system_config": FAST_FAILURE_DETECTION}
        if dashboard:
            # None: Ray tries 8265 and the next 50 ports itself, so a port
            # taken between our choice and its bind costs a retry, not the run.
            head_args.update(dashboard_host="127.0.0.1", dashboard_port=None)
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
        try:
            state = SimpleNamespace(cluster=cluster, head_ip=cluster.head_node.node_ip_address,
                                    address=cluster.address,
                                    dashboard=dashboard and f"http://{cluster.webui_url}")
            assert state.head_ip != WORKER_IP
            # Its own temp folder, as another machine has its own disk: on a
            # shared one, the worker node's runtime-env cleanup would delete
            # the job's working directory from under the driver on the head.
            state.add_worker = lambda: cluster.add_node(
                num_cpus=1, node_ip_address=WORKER_IP, temp_dir=str(root / "w"))
            state.worker = state.add_worker()
            cluster.wait_for_nodes()
            yield state
        finally:
            cluster.shutdown()
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_search_through_ray_job_submit_runs_on_both_nodes(ray_cluster, tmp_path):
    assert ray_cluster.dashboard, "ray job submit needs Ray's dashboard: install ray[default]"
    from ray.job_submission import JobStatus, JobSubmissionClient

    # As README.md (Clusters) submits: the checkout as the job's working directory
    # (shipped to every node), the search path relative to it, and storage
    # given as a URI like a bucket's (s3://, gs://): trials then write on
    # their node and Tune uploads their files, through pyarrow as for a bucket.
    job_id = f"daae-smoke-{tmp_path.name}"
    run([BIN / "ray", "job", "submit", "--address", ray_cluster.dashboard,
         "--submission-id", job_id, "--working-dir", ROOT, "--",
         "daae", "tune", "--config", "configs/tune/smoke.yaml", "--address", "auto",
         f"storage_path=file://{tmp_path}", *QUICK], timeout=300)
    assert JobSubmissionClient(ray_cluster.dashboard).get_job_status(job_id) == JobStatus.SUCCEEDED
    reports = finished_search(tmp_path / "smoke", trials=2)
    log.info("ray job submit: %s", where(reports, ray_cluster.head_ip))
    assert {r["node_ip"] for rs in reports.values() for r in rs} == {
        ray_cluster.head_ip, WORKER_IP}


@pytest.mark.slow
def test_killed_worker_node_trial_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    """The worker node dies (every Ray process on it SIGKILLed) once its trial
    has reported a checkpoint; Tune retries that trial on the head, from that
    checkpoint, and the search still finishes."""
    steps = 120  # room to kill the worker's trial well before its end
    command = [BIN / "daae", "tune", "--config", SMOKE, "--address", ray_cluster.address,
               f"storage_path={tmp_path}", *QUICK, f"overrides.train.max_steps={steps}",
               "max_failures=3"]
    search = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    experiment = tmp_path / "smoke"
    started = time.monotonic()
    try:
        victim = None
        while victim is None:
            assert search.poll() is None, search.stdout.read()[-5000:]
            assert time.monotonic() - started < 240, "no trial checkpointed on the worker node"
            for trial in trial_dirs(experiment) if experiment.is_dir() else []:
                reported = [r for r in results(trial) if r["node_ip"] == WORKER_IP]
                # Each report at a checkpoint step carries its checkpoint. Tune
                # logs a report before the save task that registers its
                # checkpoint returns, and asks for the next report only after
                # it: once a second report is logged, the first one's
                # checkpoint is registered; the latest one's may not be.
                if len(reported) >= 2:
                    assert not reported[-1]["final"], "the worker's trial finished before the kill"
                    victim, registered = trial.name, reported[-2]["step"]
                    killed_at = reported[-1]["step"]
            time.sleep(0.2)
        ray_cluster.cluster.remove_node(ray_cluster.worker, allow_graceful=False)
        log.info("killed the worker node while %s was at step %d", victim, killed_at)
        output, _ = search.communicate(timeout=300)
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
        if ray_cluster.worker not in ray_cluster.cluster.worker_nodes:
            ray_cluster.worker = ray_cluster.add_worker()
    assert search.returncode == 0, output[-5000:]
    log.info("%s: rc 0 in %.1fs", shlex.join(map(str, command)), time.monotonic() - started)
    reports = finished_search(experiment, trials=2)
    log.info("node kill: %s", where(reports, ray_cluster.head_ip))
    rows = reports[victim]
    on_worker = [r for r in rows if r["node_ip"] == WORKER_IP]
    on_head = [r for r in rows if r["node_ip"] == ray_cluster.head_ip]
    assert rows == on_worker + on_head and on_worker and on_head
    # The retry restored the last checkpoint Tune had registered from the dead
    # node (at least the one registered before the kill: the node can die
    # between a report and its save, or after a save whose report's row the
    # driver had not yet logged) and went on from there.
    resumed = on_head[0]["resumed_from_step"]
    checkpoint_every = yaml.safe_load(SMOKE.read_text())["overrides"]["run.checkpoint_every"]
    assert resumed >= registered and resumed % checkpoint_every == 0, (resumed, registered, killed_at)
    assert all(r["step"] > resumed for r in on_head)
    assert on_head[-1]["final"] and on_head[-1]["step"] == steps
    assert all(r["resumed_from_step"] == 0 for r in on_worker)
