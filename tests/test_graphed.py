"""train.cuda_graph. The capture itself needs CUDA (the last test, skipped
elsewhere); what decides whether it can work is checked on any machine: the
iteration never reads a device value back to the host, the option is refused
where it cannot run, and a run captures anew exactly when a baked-in value
changes, replaying what the eager loop computes."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from daae.config import ConfigError, load_config
from daae.data import load_data
from daae.graphed import capture_key
from daae.iteration import training_iteration
from daae.optimizers import build_optimizers, set_learning_rates
from daae.prepare import make_accelerator, prepare_training
from daae.runs import build_networks
from daae.train import train

from conftest import ROOT, tiny_config

# Operators that make the host wait for the device: .item() / float() / bool()
# on a tensor, and those that size their output from the data. Inside a CUDA
# graph capture each fails.
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.bincount.default",
              "aten.masked_select.default", "aten.unique_consecutive.default",
              "aten._unique2.default", "aten.repeat_interleave.Tensor"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()))
        if name in HOST_READS or boolean_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("step_mode, target", [("fused", "soft"), ("fused", "hard"),
                                               ("reference", "soft"), ("reference", "hard")])
def test_an_iteration_never_reads_a_device_value_back(tmp_path, step_mode, target):
    # Every term the shipped configs use, past every start epoch.
    config = tiny_config(tmp_path, f"train.step_mode={step_mode}", "data.max_shift=2",
                         "loss.correlation_input=clean", "loss.decorrelation_objective=uniform",
                         f"loss.correlation_target={target}", "loss.consistency=1", "loss.vat=1",
                         "loss.independence=1", "model.input_noise=0.1")
    setup = prepare_training(config, make_accelerator("no"), load_data(config.data, config.seed))
    training_iteration(setup.ctx, setup.optimizers, setup.batches, 6, 0, config)  # Adam's state exists
    with HostReads() as reads:
        losses = training_iteration(setup.ctx, setup.optimizers, setup.batches, 6, 1, config)
    assert {"vat", "consistency", "independence", "decorrelation"} <= losses.keys()
    assert reads.found == []


def test_the_host_read_check_catches_a_host_read():
    with HostReads() as reads:
        x = torch.arange(6.0)
        torch.bincount(torch.tensor([1, 2]))
        x[x > 2].sum().item()
    assert reads.found == ["aten.bincount.default", "aten.index.Tensor",
                           "aten._local_scalar_dense.default"]


@pytest.mark.parametrize("override, fix", [
    ("train.mixed_precision=fp16", "train.mixed_precision=bf16"),
    ("train.compile=default", "train.compile=no"),
])
def test_cuda_graph_refuses_what_it_cannot_capture(tmp_path, override, fix):
    with pytest.raises(ConfigError, match=f"train.cuda_graph: .*{fix}"):
        tiny_config(tmp_path, "train.cuda_graph=true", override)


def test_cuda_graph_on_a_cpu_stops_before_training_and_names_the_fix(tmp_path):
    config = tiny_config(tmp_path, "train.cuda_graph=true")
    with pytest.raises(ConfigError, match="train.cuda_graph=true needs a CUDA GPU.*train.cuda_graph=false"):
        train(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_captures_anew_exactly_when_a_rate_or_a_weight_changes():
    config = load_config(ROOT / "configs" / "mnist_p100.yaml")
    optimizers = build_optimizers(build_networks(config, (1, 28, 28), 10), config)
    changes, previous = [], None
    for epoch in range(config.train.epochs):
        set_learning_rates(optimizers, epoch, config)
        key = capture_key(config, optimizers, epoch)
        if key != previous:
            changes.append(epoch)
        previous = key
    starts = {config.loss.decorrelation_start_epoch, config.loss.vat_start_epoch}
    if config.loss.correlation_batch_norm == "evaluation":
        starts.add(config.loss.correlation_batch_norm_start_epoch)
    assert changes == sorted({0, *starts, *config.train.lr_milestones})
    assert len(changes) <= 6  # a capture costs about a second; a run makes a handful


class EagerGraphs:
    """CudaGraphs' stand-in: a "capture" records the iteration without running
    it, as CUDA does, and each replay runs it into the same outputs."""

    def __init__(self):
        self.warmups = 0
        self.captured_steps = []

    def warmup(self, iteration):
        self.warmups += 1
        return iteration()

    def capture(self, iteration, generator):
        self.captured_steps.append(self.warmups)
        outputs = {}
        return (lambda: outputs.update(iteration())), outputs


def _eager_and_graphed_losses(tmp_path, step_mode, graphs):
    """Four epochs' losses, step by step, of training_iteration and of
    GraphedStep over ``graphs`` (None: real CUDA graphs), with a capture
    afresh at a learning-rate drop, when C's evaluation codes start and when
    VAT starts."""
    from daae.graphed import GraphedStep

    config = tiny_config(tmp_path, f"train.step_mode={step_mode}", "data.max_shift=2",
                         "data.synthetic_train_size=800", "data.validation_size=100",
                         "loss.correlation_input=clean", "loss.decorrelation_objective=uniform",
                         "loss.vat=1", "loss.vat_start_epoch=2", "loss.independence=1",
                         "loss.decorrelation_start_epoch=0", "train.lr_milestones=[3]",
                         "loss.correlation_batch_norm=evaluation",
                         "loss.correlation_batch_norm_start_epoch=1")
    data = load_data(config.data, config.seed)
    histories, step_fn = [], None
    for graphed in (False, True):
        setup = prepare_training(config, make_accelerator("no"), data)
        step_fn = GraphedStep(setup, config, graphs) if graphed else None
        per_epoch = setup.batches.steps_per_epoch
        history = []
        for step in range(4 * per_epoch):
            epoch, step_in_epoch = divmod(step, per_epoch)
            if step_in_epoch == 0:
                set_learning_rates(setup.optimizers, epoch, config)
            losses = (step_fn(epoch, step_in_epoch) if graphed else training_iteration(
                setup.ctx, setup.optimizers, setup.batches, epoch, step_in_epoch, config))
            history.append({name: float(value) for name, value in losses.items()})
        histories.append(history)
    return histories, step_fn, per_epoch


@pytest.mark.parametrize("step_mode", ["fused", "reference"])
def test_graphed_steps_train_as_the_eager_loop_does(tmp_path, step_mode):
    """Warm-up, capture and replay, and the unlabelled batch each replay
    reads, with an eager stand-in for the graph: the same losses, step for
    step, as training_iteration."""
    from daae.graphed import WARMUP_ITERATIONS

    stand_in = EagerGraphs()
    (eager, graphed), step_fn, per_epoch = _eager_and_graphed_losses(tmp_path, step_mode, stand_in)
    assert per_epoch > WARMUP_ITERATIONS + 1
    assert graphed == eager
    # Captures at epoch 0, when C's evaluation codes start (1), at VAT's start
    # (2) and at the drop (3), each after its warm-up.
    assert stand_in.captured_steps == [WARMUP_ITERATIONS * k for k in (1, 2, 3, 4)]
    assert step_fn.captures == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("step_mode", ["fused", "reference"])
def test_real_cuda_graphs_train_as_the_eager_loop_does(tmp_path, step_mode):
    """The same with the capture itself (no CPU machine can run it): each
    replay gives the eager step's losses, up to the GPU's float reordering."""
    (eager, graphed), step_fn, _ = _eager_and_graphed_losses(tmp_path, step_mode, None)
    assert step_fn.captures == 4
    for step, (want, got) in enumerate(zip(eager, graphed)):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-4), step
