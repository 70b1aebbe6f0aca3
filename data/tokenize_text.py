"""Turn any text source into GPT-2 token shards in the format trainer.py reads.

    # local files (jsonl with a "text" field, parquet with a "text" column, or .txt = one document)
    python data/tokenize_text.py --files "corpus/*.jsonl" --out data/shards/mycorpus
    # a Hub dataset, streamed (e.g. the FineWeb-EDU path past 10B tokens)
    python data/tokenize_text.py --hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-100BT --out data/shards/fwe100

Each document becomes `<|endoftext|> tokens`. A document goes to the validation split when
a hash of its text falls under --val-permille, so validation never overlaps training
(exact duplicates land on the same side). Shards: {prefix}_val_NNNNNN.bin and
{prefix}_train_NNNNNN.bin. Runs in parallel over --workers processes.

Resumable: progress ({prefix}.progress.json and the pending tokens) is saved with each train
shard and at --max-docs, and a rerun with the same arguments continues to the same shards
as one uninterrupted run. Local files are read again from the start and the documents
already done are skipped without tokenizing them. A Hub stream continues from its saved
position (datasets' IterableDataset.state_dict: Arrow-backed data without re-reading
what was done, other formats from the start of the current file, skipping ahead);
a progress file without that position (older versions) re-streams and skips instead.
"""
import argparse
import glob
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys

import numpy as np
from tqdm import tqdm

from shards import write_shard

EOT = 50256
_enc = None


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    global _enc
    if _enc is None:
        import tiktoken

        try:
            _enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(
                f"cannot load GPT-2's BPE files ({type(e).__name__}: {e}). tiktoken downloads them (network access) "
                "or reads them from the folder named by TIKTOKEN_CACHE_DIR. Offline: with GPT-2's vocab.bpe and "
                "encoder.json in SRC_DIR, run `python -c \"import tokenizer; tokenizer.install_offline_bpe('SRC_DIR', "
                "'CACHE_DIR')\"` from the repo root and set TIKTOKEN_CACHE_DIR=CACHE_DIR") from None
    return [np.array([EOT] + ids, dtype=np.uint16) for ids in _enc.encode_ordinary_batch(texts)]


def is_val(text: str, permille: int) -> bool:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") % 1000 < permille


def iter_local(patterns: list[str], field: str):
    paths = sorted(p for pat in patterns for p in glob.glob(pat))
    if not paths:
        raise FileNotFoundError(f"no files match {patterns}")
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if field not in row:
                            raise KeyError(f"{path}:{n}: no field {field!r} (keys: {sorted(row)}); use --field")
                        yield row[field]
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if field not in table.column_names:
                raise KeyError(f"{path}: no column {field!r} (columns: {table.column_names}); use --field")
            yield from table.column(field).to_pylist()
        elif path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
        else:
            raise ValueError(f"{path}: unsupported file type (use .jsonl, .parquet or .txt)")


def batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--files", nargs="+", help="glob(s) of local .jsonl/.parquet/.txt files")
    src.add_argument("--hf-dataset", help="Hub dataset name, streamed")
    ap.add_argument("--hf-config", default=None)
    ap.add_argument("--split", default="train")
    ap.add_argument("--field", default="text")
    ap.add_argument("--out", required=True, help="output prefix, e.g. data/shards/mycorpus")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--val-permille", type=int, default=5, help="documents per 1000 routed to validation")
    ap.add_argument("--max-docs", type=int, default=0,
                    help="stop after this many documents in all (0 = all); progress is kept and a later run continues "
                         "(see Resumable above)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batch-docs", type=int, default=256)
    args = ap.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    state_path = args.out + ".progress.json"
    state = {"docs": 0, "train_shard": 1, "val_shard": 0}
    pending = {"train": np.zeros(0, np.uint16), "val": np.zeros(0, np.uint16)}
    if os.path.exists(state_path):  # resume
        state = json.load(open(state_path))
        for split in pending:
            p = f"{args.out}.pending_{split}.npy"
            if os.path.exists(p):
                pending[split] = np.load(p)
        print(f"resuming after {state['docs']:,} documents")
        if state.get("done"):
            print("already complete")
            return

    stream = None  # a Hub stream, whose position is saved with the progress
    if args.files:
        texts = iter_local(args.files, args.field)
    else:
        from datasets import load_dataset

        stream = load_dataset(args.hf_dataset, args.hf_config, split=args.split, streaming=True)
        if state.get("stream") is not None:
            stream.load_state_dict(state["stream"])
        elif state["docs"]:
            print(f"the progress file has no stream position (older version): "
                  f"re-streaming the first {state['docs']:,} documents to skip them")
        texts = (row[args.field] for row in stream)
    skip = 0 if stream is not None and state.get("stream") is not None else state["docs"]  # texts read and dropped
    more = max(0, args.max_docs - state["docs"]) if args.max_docs else None  # texts to tokenize
    # islice stops before reading past --max-docs, so the saved stream position is exact
    texts = itertools.islice(texts, skip, None if more is None else skip + more)

    def batches():  # (texts, the stream's position after them): in-flight batches read ahead of what is saved
        for b in batched(texts, args.batch_docs):
            yield b, None if stream is None else stream.state_dict()

    bufs = {k: [v] for k, v in pending.items()}
    sizes = {k: v.size for k, v in pending.items()}

    def flush(split, final=False):
        while sizes[split] >= args.shard_tokens or (final and sizes[split] > 0):
            flat = np.concatenate(bufs[split])
            n = min(args.shard_tokens, flat.size)
            key = f"{split}_shard"
            write_shard(f"{args.out}_{split}_{state[key]:06d}.bin", flat[:n])
            state[key] += 1
            bufs[split], sizes[split] = [flat[n:]], flat.size - n

    def save_state(done=False):
        for split in bufs:
            flat = np.concatenate(bufs[split])
            bufs[split] = [flat]
            np.save(f"{args.out}.pending_{split}.npy.tmp.npy", flat)
            os.replace(f"{args.out}.pending_{split}.npy.tmp.npy", f"{args.out}.pending_{split}.npy")
        json.dump({**state, "done": done}, open(state_path + ".tmp", "w"))
        os.replace(state_path + ".tmp", state_path)

    with mp.get_context("spawn").Pool(args.workers) as pool, tqdm(unit="doc", initial=state["docs"]) as bar:
        for texts_b, position, toks_b in zip_batches(pool, batches(), 4 * args.workers):
            shard_before = state["train_shard"]
            for text, toks in zip(texts_b, toks_b):
                split = "val" if is_val(text, args.val_permille) else "train"
                bufs[split].append(toks)
                sizes[split] += toks.size
            state["docs"] += len(texts_b)
            if position is not None:
                state["stream"] = position
            bar.update(len(texts_b))
            flush("val")
            flush("train")
            if state["train_shard"] != shard_before:
                save_state()
    if args.max_docs and state["docs"] >= args.max_docs:  # stopped early: keep the partial buffers for a later run
        save_state(done=False)
        print(f"stopped after {state['docs']:,} documents; run again without --max-docs to continue")
        return
    flush("val", final=True)
    flush("train", final=True)
    save_state(done=True)
    print(f"{state['docs']:,} documents -> {state['train_shard'] - 1} train and {state['val_shard']} val shards at {args.out}_*")


def zip_batches(pool, batches, in_flight: int):
    """Tokenize (texts, tag) batches in parallel, in order, yielding (texts, tag, token arrays)."""
    window = []
    for texts, tag in batches:
        window.append((texts, tag, pool.apply_async(_encode_batch, (texts,))))
        if len(window) >= in_flight:
            texts, tag, res = window.pop(0)
            yield texts, tag, res.get()
    for texts, tag, res in window:
        yield texts, tag, res.get()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
