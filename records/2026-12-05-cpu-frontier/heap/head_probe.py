"""RSS of KBERT's MLM head alone on CPU (the frontier's size, bf16 autocast, one thread): the
encoder runs without gradients, then the head loss and its backward, once a step, with the
number of masked tokens as the step's masking gives it ("varying") or cut to 512 ("fixed").
Run from the repository root, ROOT being a checkout of the commit to measure:
    OMP_NUM_THREADS=1 taskset -c 0 python records/2026-12-05-cpu-frontier/heap/head_probe.py ROOT varying|fixed STEPS"""
import glob
import sys

import numpy as np
import torch

sys.path.insert(0, sys.argv[1])
import trainer  # noqa: E402
from model import KBERT  # noqa: E402

torch.set_num_threads(1)
mode, steps = sys.argv[2], int(sys.argv[3])
hp = trainer.parse_args(["--model.preset", "tiny", "--model.n_layer", "4", "--model.d_model", "128", "--model.n_head", "2",
                         "--model.d_mlp", "320", "--data.seq_len", "512"])
model = KBERT(hp.model)
model.init_weights(seed=0)
loader = trainer.PackedLoader(sorted(glob.glob("data/shards/frontier_train_*.bin")), 512, seed=0)
windows = model.default_windows(torch.device("cpu"))


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


print(f"{mode}, model.py of {sys.argv[1]}", flush=True)
for i in range(steps):
    batch, _ = loader.next_batch(8)
    inputs, labels = trainer.mask_tokens(torch.from_numpy(batch.astype(np.int64)), 0, i, 0.3, 0.1, 0.1)
    if mode == "fixed":
        flat = labels.flatten().clone()
        flat[(flat >= 0).nonzero().flatten()[512:]] = -100
        labels = flat.view_as(labels)
    with torch.no_grad():
        h = model(inputs, windows)
    h.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.mlm_loss(h, labels, "mean")[0]
    loss.backward()
    if (i + 1) % 25 == 0:
        print(f"step {i + 1} rss {rss_mb():.0f} MB", flush=True)
