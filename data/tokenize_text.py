"""Turn any text source into GPT-2 token shards in the format trainer.py reads.

    # local files (jsonl with a "text" field, parquet with a "text" column, or .txt = one document)
    python data/tokenize_text.py --files "corpus/*.jsonl" --out data/shards/mycorpus
    # a Hub dataset, streamed (e.g. the FineWeb-EDU path past 10B tokens)
    python data/tokenize_text.py --hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-100BT --out data/shards/fwe100

Each document becomes `<|endoftext|> tokens`. A document goes to the validation split when
a hash of its text falls under --val-permille, so validation never overlaps training
(exact duplicates land on the same side). A corpus of 2 or more documents always gets a
validation shard: when the hash picked none, the last document (with any exact duplicates)
is held out. Shards: {prefix}_val_NNNNNN.bin and {prefix}_train_NNNNNN.bin. Runs in
parallel over --workers processes.

Resumable: progress ({prefix}.progress.json and the pending tokens) is saved with each train
shard and at --max-docs, and a rerun with the same arguments continues to the same shards
as one uninterrupted run. The progress file records what the shards are made of: every
input file with its size and modification time (or the Hub dataset, config and split) and
the options that shape the shards (--field, --shard-tokens, --val-permille). A rerun whose
inputs or options differ is refused in one line; --restart deletes the prefix's shards and
progress and starts over (or choose a new --out). Local files are read again from the start and the documents
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

from shards import open_shard, write_shard

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


def local_paths(patterns: list[str]) -> list[str]:
    paths = sorted({p for pat in patterns for p in glob.glob(pat)})
    if not paths:
        raise FileNotFoundError(f"no files match {patterns}")
    return paths


def inputs_record(args, paths: list[str] | None) -> dict:
    """What the shards under --out are made of: the input files with their sizes and
    modification times (or the Hub dataset), and the options that shape the shards."""
    if paths is not None:
        source = {"files": [{"path": p, "bytes": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns} for p in paths]}
    else:
        source = {"hf_dataset": args.hf_dataset, "hf_config": args.hf_config, "split": args.split}
    return {**source, "field": args.field, "shard_tokens": args.shard_tokens, "val_permille": args.val_permille}


def record_difference(old: dict | None, new: dict) -> str | None:
    """The first way in which a progress file's record differs from this run's, or None."""
    if old is None:
        return "it names no inputs (an older tokenize_text.py wrote it)"
    if old == new:
        return None
    before = {f["path"]: f for f in old.get("files", [])}
    for f in new.get("files", []):
        if f["path"] not in before:
            return f"{f['path']} is a new input"
        if f != before[f["path"]]:
            was = before[f["path"]]
            return (f"{f['path']} changed ({was['bytes']:,} -> {f['bytes']:,} bytes)" if was["bytes"] != f["bytes"] else
                    f"{f['path']} was modified since")
    for key in old:
        if key != "files" and old.get(key) != new.get(key):
            return f"{key} was {old.get(key)!r}, now {new.get(key)!r}"
    return f"{sorted(set(before) - {f['path'] for f in new.get('files', [])})[0]} is no longer an input"


def restart(out: str) -> list[str]:
    """Delete what a run with this --out prefix wrote: shards, pending tokens, progress."""
    names = [p for pat in ("_train_*.bin", "_val_*.bin", ".pending_*.npy", ".progress.json") for p in glob.glob(glob.escape(out) + pat)]
    for p in names:
        os.remove(p)
    return names


def hold_out_last_document(out: str, shard_tokens: int) -> tuple[int, int]:
    """When the hash sent no document to validation: the last training document, and every
    exact duplicate of it, move to {out}_val_000000.bin and the train shards are rewritten
    without them (a corpus this small is read in memory). Returns (documents, tokens) held out;
    (0, 0) when every document is the same text."""
    paths = sorted(glob.glob(glob.escape(out) + "_train_*.bin"))
    tokens = np.concatenate([np.asarray(open_shard(p)) for p in paths])
    docs = np.split(tokens, np.flatnonzero(tokens == EOT)[1:])
    last = docs[-1]
    held = [len(d) == len(last) and np.array_equal(d, last) for d in docs]
    if all(held):
        return 0, 0
    train = np.concatenate([d for d, h in zip(docs, held) if not h])
    for p in paths:
        os.remove(p)
    for k, start in enumerate(range(0, train.size, shard_tokens)):
        write_shard(f"{out}_train_{k + 1:06d}.bin", train[start:start + shard_tokens])
    write_shard(f"{out}_val_000000.bin", np.concatenate([d for d, h in zip(docs, held) if h]))
    return sum(held), int(tokens.size - train.size)


def iter_local(paths: list[str], field: str):
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


def permille(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 999:
        raise argparse.ArgumentTypeError(f"{value} is not in 1-999")
    return n


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
    ap.add_argument("--val-permille", type=permille, default=5,
                    help="documents per 1000 routed to validation, 1-999 (at least one of 2+ documents always is)")
    ap.add_argument("--max-docs", type=int, default=0,
                    help="stop after this many documents in all (0 = all); progress is kept and a later run continues "
                         "(see Resumable above)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batch-docs", type=int, default=256)
    ap.add_argument("--restart", action="store_true",
                    help="delete the shards, pending tokens and progress of --out first and tokenize from scratch")
    args = ap.parse_args(argv)

    paths = local_paths(args.files) if args.files else None
    record = inputs_record(args, paths)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.restart:
        print(f"--restart: removed {len(restart(args.out))} files of {args.out}")
    state_path = args.out + ".progress.json"
    state = {"docs": 0, "train_shard": 1, "val_shard": 0, "inputs": record}
    pending = {"train": np.zeros(0, np.uint16), "val": np.zeros(0, np.uint16)}
    how = f"pass --restart to tokenize from scratch into {args.out}, or choose another --out"
    if not os.path.exists(state_path) and any(glob.glob(glob.escape(args.out) + f"_{k}_*.bin") for k in ("train", "val")):
        raise SystemExit(f"error: shards {args.out}_*.bin exist but no {state_path} says what they hold: {how}")
    if os.path.exists(state_path):  # resume
        state = json.load(open(state_path))
        why = record_difference(state.get("inputs"), record)
        if why:
            raise SystemExit(f"error: {state_path} records other inputs or options than this command's ({why}): {how}")
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
        texts = iter_local(paths, args.field)
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
    if state["val_shard"] == 0 and state["docs"] >= 2:  # the hash held out nothing: a small corpus
        docs, tokens = hold_out_last_document(args.out, args.shard_tokens)
        if docs:
            state["val_shard"], state["train_shard"] = 1, len(glob.glob(glob.escape(args.out) + "_train_*.bin")) + 1
            print(f"no document's hash fell under --val-permille {args.val_permille}: held out the last document "
                  f"({docs} cop{'ies' if docs > 1 else 'y'}, {tokens:,} tokens) for validation")
        else:
            print("every document is the same text: no validation shard (it would repeat the training data)")
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
