import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMOKE

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    # Not a fixed port: two test runs on one machine would collide on it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_two_processes(*args: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_a_two_process_run_resumed_from_its_checkpoint_ends_as_the_straight_run(tmp_path):
    # Each rank restores its own random stream from the checkpoint's stacked
    # states; rank 1's used to crash the resume (SIGSEGV). Step 13 is off the
    # evaluation and checkpoint steps, where the straight run does not average
    # the ranks' batch-norm statistics: each rank goes on with its own, which
    # C reads through the evaluation codes.
    split_at = 13
    common = ["-m", "daae", "train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.checkpoint_every=10",
              "run.eval_every=10", "run.progress_bar=false", "eval.final_test=false", "eval.probe_epochs=1",
              "loss.correlation_batch_norm=evaluation", "loss.correlation_input=clean"]
    for args in (["run.name=straight", "train.max_steps=20"],
                 ["run.name=split", f"train.max_steps={split_at}"]):
        done = _launch_two_processes(*common, *args)
        assert done.returncode == 0, done.stderr[-3000:]
    done = _launch_two_processes("-m", "daae", "train", "--resume", str(tmp_path / "split"),
                                 "train.max_steps=20")
    assert done.returncode == 0, done.stderr[-3000:]
    straight, split = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
                       for name in ("straight", "split"))
    assert split["step"] == straight["step"] == 20
    for name, tensor in straight["networks"].items():
        assert torch.equal(tensor, split["networks"][name]), name
    assert torch.equal(straight["rng"]["generators"], split["rng"]["generators"])


@pytest.mark.parametrize("step_mode,codes", [("reference", "training"), ("fused", "training"),
                                             ("fused", "evaluation")])
def test_two_cpu_processes_keep_identical_parameters(tmp_path, step_mode, codes):
    done = _launch_two_processes(
        str(HERE / "ddp_worker.py"), str(tmp_path), str(SMOKE), f"run.dir={tmp_path}",
        "run.name=ddp", "train.max_steps=60", f"train.step_mode={step_mode}", "run.progress_bar=false",
        "run.checkpoint_every=25", "eval.final_test=false", "eval.probe_epochs=1",
        # The extra phases and VAT's power iteration (a forward DDP must not see).
        "data.max_shift=1", "loss.consistency=0.5", "loss.vat=0.5",
        # With evaluation codes C's rows take a second forward outside DDP.
        f"loss.correlation_batch_norm={codes}", "loss.correlation_input=clean")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    # Each rank drew its own share of the images, and the steps moved the weights.
    first = [set(rank["first_index"].tolist()) for rank in ranks]
    assert len(first[0]) == len(first[1]) > 0 and not first[0] & first[1]
    assert not all(torch.equal(tensor, ranks[0]["initial"][name])
                   for name, tensor in ranks[0]["state"].items())
    assert (tmp_path / "ddp" / "checkpoints" / "last.pt").is_file()


def _tracker_process(rank: int, init_file: str, out: str) -> None:
    from daae.tracker import LossTracker, NonFiniteLossError

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    tracker = LossTracker(torch.device("cpu"))
    tracker.add(1, {"reconstruction": torch.tensor(1.0 + rank), "supervised": torch.tensor(3.0)})
    tracker.check()
    means = tracker.pop_means()
    # A loss that went non-finite on rank 1 only, as one batch's overflow can.
    tracker.add(2, {"reconstruction": torch.tensor(float("nan") if rank else 1.0),
                    "supervised": torch.tensor(3.0)})
    try:
        tracker.check()
        stopped = None
    except NonFiniteLossError as exc:
        stopped = str(exc)
    torch.save({"means": means, "stopped": stopped}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_every_process_logs_the_mean_over_all_and_stops_when_any_diverges(tmp_path):
    torch.multiprocessing.spawn(_tracker_process, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["means"] == {"reconstruction": 1.5, "supervised": 3.0}
        assert result["stopped"] == "the reconstruction loss became non-finite at step 2"
