"""RSS of KBERT's training step on CPU at the frontier's size (width 128, 4 layers, 8 x 512 tokens,
eager, bf16 autocast, trainer.train_step with its Muon/Adam optimizer), without and with
glibc's malloc_trim every 50 steps (commit 35885d3's common.release_free_memory, since reverted). Run from the repository root:
    OMP_NUM_THREADS=1 taskset -c 0 python records/2026-12-05-cpu-frontier/heap/heap_probe.py 0|50 STEPS"""
import ctypes
import glob
import sys
import time

import torch

sys.path.insert(0, ".")
import common  # noqa: E402
import trainer  # noqa: E402
from model import KBERT  # noqa: E402

torch.set_num_threads(1)
every, steps = int(sys.argv[1]), int(sys.argv[2])
hp = trainer.parse_args(["--model.preset", "tiny", "--model.n_layer", "4", "--model.d_model", "128", "--model.n_head", "2",
                         "--model.d_mlp", "320", "--data.seq_len", "512", "--train.steps", str(steps),
                         "--train.batch_tokens", "4096", "--train.micro_batch_seqs", "8", "--train.compile", "false"])
model = KBERT(hp.model)
model.init_weights(seed=0)
opt = trainer.build_optimizer(model, hp.train)
forward = trainer.make_forward(model, compile=False, precision=hp.train.precision)
dist = common.Dist(0, 0, 1, torch.device("cpu"))
loader = trainer.PackedLoader(sorted(glob.glob("data/shards/frontier_train_*.bin")), 512, seed=0)


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


print(f"release every {every or 'never'}; {torch.__version__}, {common.cpu_name()}", flush=True)
t = time.perf_counter()
for i in range(steps):
    batch, first = loader.next_batch(8)
    trainer.train_step(model, opt, forward, batch, first, i, hp.train, dist)
    if every and (i + 1) % every == 0:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if (i + 1) % 25 == 0:
        print(f"step {i + 1} rss {rss_mb():.0f} MB, {(time.perf_counter() - t) / 25 * 1000:.0f} ms a step", flush=True)
        t = time.perf_counter()
