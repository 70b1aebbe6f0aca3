"""Run by test_optimizer.py under torchrun: 4 MuonAdamW steps on 2 gloo ranks."""
import sys

import torch
import torch.distributed as dist

from test_optimizer import run_steps

dist.init_process_group("gloo")
rank = dist.get_rank()
params, opt = run_steps(rank=rank, world=dist.get_world_size())
state = opt.state_dict()  # collective: all ranks call it
if rank == 0:
    torch.save({"params": [p.detach() for p in params], "state": state}, sys.argv[1])
dist.barrier()
dist.destroy_process_group()
