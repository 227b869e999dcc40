"""Run by test_ddp.py under `accelerate launch`: trains, then each rank saves
the parameters it began and ended with and the images of its first unlabelled
batch, so the test can compare the ranks."""
import sys
from pathlib import Path

import torch

import daae.prepare
import daae.train
from daae.config import load_config
from daae.data import DeviceBatches

out = Path(sys.argv[1])
captured = {}
build = daae.prepare.build_networks


def capture(*args, **kwargs):
    captured["nets"] = build(*args, **kwargs)
    captured["initial"] = {k: v.clone() for k, v in captured["nets"].state_dict().items()}
    return captured["nets"]


index = DeviceBatches.unlabelled_index


def first_index(self, epoch, step_in_epoch):
    drawn = index(self, epoch, step_in_epoch)
    captured.setdefault("first_index", drawn.cpu())
    return drawn


daae.prepare.build_networks = capture
DeviceBatches.unlabelled_index = first_index
config = load_config(sys.argv[2], sys.argv[3:])
daae.train.train(config)
rank = torch.distributed.get_rank()
world = torch.distributed.get_world_size()
torch.save({"world": world, "state": captured["nets"].state_dict(), "initial": captured["initial"],
            "first_index": captured["first_index"]}, out / f"rank{rank}.pt")
