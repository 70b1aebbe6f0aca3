"""How full the trainer's packed rows are: the [PAD] fraction of one pass over token shards.

    python -m bench.packing --bench.files 'data/shards/prose_train_*.bin' --bench.seq_len 8192

It runs trainer.PackedLoader exactly as training does (rows of seq_len tokens), over one
pass of the shards in file order, and prints the share of [PAD] tokens and how many
documents were split across rows. Only the last row of a finite pass can hold [PAD].
"""
import dataclasses
import json
import sys

import numpy as np

import common
import trainer
from model import CLS_ID, PAD_ID


@dataclasses.dataclass
class PackingConfig:
    files: str = common.opt("data/shards/prose_train_*.bin", "non-empty")  # glob of token shards (data/tokenize_text.py)
    seq_len: int = common.opt(8192, "> 0 and a multiple of 128")  # row length, as --data.seq_len


def measure(files: list[str], seq_len: int) -> dict:
    loader = trainer.PackedLoader(files, seq_len, shuffle=False, loop=False)
    rows = []
    while not loader.exhausted:
        rows.append(loader.next_sequence())
    rows = np.stack(rows)
    if (rows[-1] == PAD_ID).all():  # the pass ended exactly at a row boundary: an empty last row
        rows = rows[:-1]
    source_docs = sum(int((np.asarray(trainer.open_shard(f)) == CLS_ID).sum()) for f in files)
    return {"files": len(files), "seq_len": seq_len, "rows": len(rows), "tokens": int(rows.size),
            "pad_tokens": int((rows == PAD_ID).sum()), "pad_fraction": float((rows == PAD_ID).mean()),
            "pad_fraction_before_last_row": float((rows[:-1] == PAD_ID).mean()) if len(rows) > 1 else 0.0,
            "source_documents": source_docs, "packed_documents": int((rows == CLS_ID).sum()),
            "mean_document_tokens": float((rows != PAD_ID).sum() / max(1, source_docs))}


def main(argv=None):
    overrides, _ = common.parse_overrides(sys.argv[1:] if argv is None else argv, {"bench": PackingConfig})
    cfg = PackingConfig(**overrides["bench"])
    common.check_config(cfg, "bench")
    result = measure(trainer.shard_files(cfg.files, "benchmark"), cfg.seq_len)
    print(json.dumps(result, indent=2))
    print(f"[PAD] {100 * result['pad_fraction']:.3f}% of {result['tokens']:,} tokens in {result['rows']:,} rows of "
          f"{cfg.seq_len:,} ({100 * result['pad_fraction_before_last_row']:.3f}% before the last row); "
          f"{result['packed_documents'] - result['source_documents']:,} extra [CLS] from split documents")
    return result


if __name__ == "__main__":
    main()
