"""The training iteration replayed from one CUDA graph (``train.cuda_graph``).

At batch 100 a GPU step of this model is bound by the host: the fused step
dispatches about 400 operators (600 with the shipped config's terms), the
reference order 600 to 900, each costing the host far longer than its kernel
takes on the GPU. A CUDA graph records every kernel of the iteration (batch
draws, shifts, forwards, backwards and Adam steps) once and replays them
with one launch.

What a graph cannot follow, because it freezes the host's side of a step:
the learning rates and loss weights (Python floats baked into kernels) and
the unlabelled batch's position in the epoch. The first is handled by
capturing afresh whenever they change (a learning-rate milestone, the epoch
a term starts), the second by reading the batch through an index tensor the
graph holds, filled before each replay. The random draws come from the
run's generator, registered with the graph, so each replay draws anew.
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import Config, ConfigError
from .iteration import iteration_on_batch, training_iteration, weights_at_epoch

# Eager iterations before each capture, on a side stream as PyTorch's CUDA
# graph notes ask: lazy initialisation (cuBLAS workspaces, Adam's state, the
# allocator's blocks) must not happen inside the capture.
WARMUP_ITERATIONS = 3


def check_supported(config: Config, device: torch.device, num_processes: int) -> None:
    """train.cuda_graph's needs that only the running process knows."""
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA GPU; this process runs on "
                          f"{device.type}: set train.cuda_graph=false")
    if num_processes != 1:
        raise ConfigError(f"train.cuda_graph=true runs in one process (DDP's gradient "
                          f"all-reduce is not captured); this run has {num_processes}: launch "
                          f"one process, or set train.cuda_graph=false")


def make_iteration(setup, config: Config) -> Callable[[int, int], dict]:
    """The run's iteration as (epoch, step_in_epoch) -> losses, for every loop
    that trains (the trainer, bench_step, bench_accuracy): replayed from a CUDA
    graph under train.cuda_graph, run eagerly otherwise."""
    if config.train.cuda_graph:
        return GraphedStep(setup, config)
    return lambda epoch, step_in_epoch: training_iteration(
        setup.ctx, setup.optimizers, setup.batches, epoch, step_in_epoch, config)


def capture_key(config: Config, optimizers: dict, epoch: int) -> tuple:
    """What a captured iteration holds fixed: the loss weights in force and
    every learning rate (as set for ``epoch``). A new key means a new capture."""
    rates = tuple(group["lr"] for optimizer in optimizers.values() for group in optimizer.param_groups)
    return weights_at_epoch(config.loss, epoch), rates


class CudaGraphs:
    """The CUDA half of GraphedStep: warm-up on a side stream, capture,
    replay. Tests on machines without CUDA hand GraphedStep an eager
    stand-in with the same two methods."""

    def __init__(self, device: torch.device):
        self.side_stream = torch.cuda.Stream(device=device)

    def warmup(self, iteration: Callable[[], dict]) -> dict:
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            losses = iteration()
        main.wait_stream(self.side_stream)
        return losses

    def capture(self, iteration: Callable[[], dict],
                generator: torch.Generator) -> tuple[Callable[[], None], dict]:
        """Records ``iteration`` without running it: returns the replay and
        the outputs each replay overwrites."""
        graph = torch.cuda.CUDAGraph()
        # Without it a draw from a generator other than the default one fails
        # the capture (torch 2.11, the device image's); later releases register
        # generators on first use and keep this call as a no-op.
        graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            outputs = iteration()
        return graph.replay, outputs


class GraphedStep:
    """Call it as ``training_iteration`` is called, with (epoch, step_in_epoch):
    it runs the same iteration and returns the same losses, as tensors the
    next call overwrites (read them, as LossTracker does, before calling again).
    """

    def __init__(self, setup, config: Config, graphs=None):
        self.setup, self.config = setup, config
        self.graphs = graphs if graphs is not None else CudaGraphs(setup.batches.device)
        self.index = torch.zeros(config.train.batch_size, dtype=torch.long,
                                 device=setup.batches.device)
        self.replay: Callable[[], None] | None = None
        self.outputs: dict | None = None
        self.key = None
        self.warmup_left = 0
        self.captures = 0

    def _iteration(self, weights) -> dict:
        setup = self.setup
        return iteration_on_batch(setup.ctx, setup.optimizers, setup.batches,
                                  setup.batches.unlabelled_images(self.index), weights, self.config)

    def _release_gradients(self) -> None:
        """Every parameter's gradient to None. Each phase zeroes only its own
        optimizer's gradients, so after eager iterations every parameter
        still holds the buffer its phase last wrote, allocated outside the
        graph's memory pool. A capture that wrote into such a buffer would
        keep writing there on every replay after it was freed; with none
        left, every gradient a capture writes is its own."""
        for optimizer in self.setup.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def __call__(self, epoch: int, step_in_epoch: int) -> dict:
        key = capture_key(self.config, self.setup.optimizers, epoch)
        weights = key[0]
        if key != self.key:
            # The old graph's memory pool goes once the gradients it allocated
            # do, at the next capture's release.
            self.key, self.replay, self.outputs = key, None, None
            self.warmup_left = WARMUP_ITERATIONS
        self.index.copy_(self.setup.batches.unlabelled_index(epoch, step_in_epoch))
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self.graphs.warmup(lambda: self._iteration(weights))
        if self.replay is None:
            self._release_gradients()
            self.replay, self.outputs = self.graphs.capture(lambda: self._iteration(weights),
                                                            self.setup.generator)
            self.captures += 1
        self.replay()
        return self.outputs
