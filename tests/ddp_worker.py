"""Run by test_ddp.py under `accelerate launch`: trains, then each rank saves
the parameters it ended with, so the test can compare the ranks."""
import sys
from pathlib import Path

import torch

import daae.prepare
import daae.train
from daae.config import load_config

out = Path(sys.argv[1])
captured = {}
build = daae.prepare.build_networks


def capture(*args, **kwargs):
    captured["nets"] = build(*args, **kwargs)
    return captured["nets"]


daae.prepare.build_networks = capture
config = load_config(sys.argv[2], sys.argv[3:])
daae.train.train(config)
rank = torch.distributed.get_rank()
world = torch.distributed.get_world_size()
torch.save({"world": world, "state": captured["nets"].state_dict()}, out / f"rank{rank}.pt")
