"""Seconds and bytes of one training checkpoint (trainer.save_checkpoint: an atomic torch.save
with fsync) of a preset, after one optimizer step so that the optimizer state exists.

    python -m bench.checkpoint_cost --bench.preset base --bench.folder /tmp/kbert-ckpt
"""
import dataclasses
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

import common
import trainer
from model import CLS_ID, KBERT


@dataclasses.dataclass
class CheckpointConfig:
    preset: str = common.opt("base", "tiny, small, base or large")  # the model preset whose checkpoint is measured
    folder: str = common.opt("bench/out/checkpoint_cost", "non-empty")  # where the checkpoints are written (and removed afterwards)
    repeats: int = common.opt(3, ">= 1")  # saves timed; the median is reported


def main(argv=None) -> dict:
    overrides, _ = common.parse_overrides(sys.argv[1:] if argv is None else argv, {"bench": CheckpointConfig})
    cfg = CheckpointConfig(**overrides["bench"])
    common.check_config(cfg, "bench")
    hp = trainer.parse_args(["--model.preset", cfg.preset, "--data.seq_len", "128", "--train.batch_tokens", "256",
                             "--train.micro_batch_seqs", "2", "--train.local_window_start", "128", "--train.global_window_start", "128"])
    torch.manual_seed(0)
    model = KBERT(hp.model)
    opt = trainer.build_optimizer(model, hp.train)
    d = common.Dist(0, 0, 1, torch.device("cpu"))
    batch = np.random.default_rng(0).integers(0, CLS_ID, (2, 128)).astype(np.int32)
    batch[:, 0] = CLS_ID
    trainer.train_step(model, opt, trainer.make_forward(model, compile=False, precision="fp32"), batch, 0, 0, hp.train, d)

    class Loader:  # the position a PackedLoader records
        def state_dict(self):
            return {"epoch": 0, "file_idx": 0, "pos": 0, "cont": False, "seq_index": 2, "files": ["x.bin"]}

    shutil.rmtree(cfg.folder, ignore_errors=True)
    log = common.RunLog("checkpoint_cost", True, log_dir=cfg.folder)
    times = []
    for i in range(cfg.repeats):
        t0 = time.perf_counter()
        path = trainer.save_checkpoint(cfg.folder, "checkpoint_cost", i + 1, model, opt, Loader(), 256, hp, 2, log)
        times.append(time.perf_counter() - t0)
    size, (estimate, _) = os.path.getsize(path), trainer.checkpoint_bytes(hp)
    shutil.rmtree(cfg.folder)
    result = {"preset": cfg.preset, "bytes": size, "estimated_bytes": estimate, "save_s": times, "median_s": statistics.median(times)}
    print(f"{cfg.preset} checkpoint: {size:,} bytes ({size / 2**30:.2f} GiB; preflight estimate {estimate:,}); "
          f"save_checkpoint {', '.join(f'{t:.2f} s' for t in times)} (median {statistics.median(times):.2f} s)")
    return result


if __name__ == "__main__":
    main()
