"""Everything one training iteration needs, built for a run: the Accelerator,
the networks and optimizers (one accelerator.prepare call, fixed order), the
process's random stream and the on-device batches."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import accelerate.optimizer
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs

from . import graphed, phases
from .config import Config
from .data import DeviceBatches
from .optimizers import build_optimizers
from .runs import build_networks

NETWORK_ORDER = ("encoder", "decoder", "d_z", "d_y", "correlation")

# Accelerate's optimizer wrapper asks importlib whether lomo_optim is installed
# twice in every step(), a search of sys.path: 14 calls an iteration in the
# reference order, 4 in the fused step, 11 % and 9 % of the host time of an
# iteration of tiny networks on this project's CPU, and host time is what
# bounds a GPU step at batch 100. The answer cannot change while the process runs.
if hasattr(accelerate.optimizer, "is_lomo_available"):
    accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def make_accelerator(mixed_precision: str, cuda_graph: bool = False) -> Accelerator:
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, mixed_precision) and state.get("num_processes", 1) == 1:
        # A long-lived single process (tests, a Tune worker) may train with
        # another precision than its previous run; Accelerate keeps one global state.
        AcceleratorState._reset_state()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if cuda_graph:
        # Autocast's cache of cast weights would outlive the capture that
        # filled it; PyTorch's CUDA graph notes ask for it off.
        handlers.append(AutocastKwargs(cache_enabled=False))
    return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers)


@dataclass
class TrainingSetup:
    nets: object  # models.Networks, unwrapped
    optimizers: dict
    generator: torch.Generator
    batches: DeviceBatches
    ctx: phases.StepContext


def _plain_forwards(nets) -> None:
    """Undo Accelerate's mixed-precision forward on each network. It replaces
    the module's own ``forward`` (the one DDP calls too) with one under autocast,
    so the networks would also run in low precision where daae means fp32: VAT's
    power iteration (a small KL's gradient underflows in bf16 and fp16: the
    direction flipped for some images) and the evaluation during training,
    which then disagreed with ``daae eval`` on the same checkpoint. Every
    training forward runs in an explicit ``accelerator.autocast()`` and casts
    what it hands a loss to fp32, so training keeps its precision."""
    for name in NETWORK_ORDER:
        attributes = vars(getattr(nets, name))
        if "_original_forward" in attributes:
            del attributes["_original_forward"], attributes["forward"]


def prepare_training(config: Config, accelerator: Accelerator, data) -> TrainingSetup:
    """Networks, optimizers (one accelerator.prepare call, fixed order), the
    process's random stream and on-device batches: all one iteration needs."""
    device = accelerator.device
    if config.train.cuda_graph:
        graphed.check_supported(config, device, accelerator.num_processes)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    nets = build_networks(config, data.image_shape, data.num_classes).to(device)
    if config.model.kind == "conv" and config.train.channels_last:
        nets.to(memory_format=torch.channels_last)  # 4-d weights only: the critics stay as they are
    optimizers = build_optimizers(nets, config)
    if config.train.cuda_graph:
        # Adam's step count and bias correction then stay on the device,
        # which the captured step needs (Adam refuses capture otherwise).
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["capturable"] = True
    prepared = accelerator.prepare(*(getattr(nets, name) for name in NETWORK_ORDER),
                                   *optimizers.values())
    wrapped = dict(zip(NETWORK_ORDER, prepared[:len(NETWORK_ORDER)]))
    _plain_forwards(nets)
    if config.train.compile != "no":
        # Only the training forwards: evaluation and the reference order's frozen
        # forwards use the eager networks, so varying batch sizes and frozen
        # weights never trigger recompiles. A run's shapes are fixed: static
        # graphs, also when an earlier run in this process compiled other shapes.
        mode = None if config.train.compile == "default" else config.train.compile
        # Dynamo files graphs per function and input shape; when Accelerate's
        # shared forward wrapper still stood (mixed precision, before
        # _plain_forwards), every network's graph fell under one function, past
        # the default limit of 8, and the rest ran eager with only a warning
        # (bench_step on an H200). The raised limit stays as a margin.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   8 * len(wrapped))
        wrapped = {name: torch.compile(module, mode=mode, dynamic=False)
                   for name, module in wrapped.items()}
    optimizers = dict(zip(optimizers, prepared[len(NETWORK_ORDER):]))
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed * 1_000_003 + accelerator.process_index)
    batches = DeviceBatches(data, device, config.train.batch_size, config.seed,
                            accelerator.process_index, accelerator.num_processes)
    ctx = phases.StepContext(accelerator, wrapped, nets, generator, config.model.input_noise,
                             data.num_classes, config.model.z_dim,
                             class_conditional_prior=config.model.class_conditional_prior)
    return TrainingSetup(nets, optimizers, generator, batches, ctx)
