"""trainer.main in a process of its own, for the tests of stopped and resumed runs
(tests/test_trainer.py): rank 0 writes the run's history (exact losses) as JSON to
$KBERT_HISTORY. With $KBERT_HALF_SAVE=N the N-th checkpoint write stops halfway (half the
bytes written and flushed, a line printed) and waits there to be killed. Exports get no
tokenizer files (they cost 1-2 s a run and these tests do not read them)."""
import io
import json
import os
import sys
import time

import torch

import tokenizer
import trainer

tokenizer.save_hf_tokenizer = lambda *args, **kwargs: None

half_save = int(os.environ.get("KBERT_HALF_SAVE", 0))
if half_save:
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < half_save:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        print(f"half-written checkpoint {f.name}", flush=True)
        time.sleep(300)

    torch.save = save

out = trainer.main(sys.argv[1:])
if os.environ.get("KBERT_HISTORY") and int(os.environ.get("RANK", 0)) == 0:
    with open(os.environ["KBERT_HISTORY"], "w") as f:
        json.dump(out["history"], f)
