"""Run by test_optimizer.py under torchrun: 4 MuonAdamW steps on 2 gloo ranks."""
import os
import sys

import torch

import common
from test_optimizer import run_steps

d = common.setup_distributed("cpu")
params, opt = run_steps(rank=d.rank, world=d.world)
state = opt.state_dict()  # collective: all ranks call it
if d.master:
    torch.save({"params": [p.detach() for p in params], "state": state}, sys.argv[1])
common.cleanup_distributed(d)
# gloo worker threads still running now would outlive the interpreter and may abort the
# process at exit; the test asserts there are none (Linux lists threads in /proc)
if os.path.isdir("/proc/self/task"):
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    print(f"rank {d.rank} gloo threads after cleanup: {sum('gloo' in n for n in names)}")
