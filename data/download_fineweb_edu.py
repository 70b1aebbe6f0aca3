"""Download the pre-tokenized GPT-2 FineWeb-EDU shards (kjj0/finewebedu10B-gpt2).

    python data/download_fineweb_edu.py            # val shard + all 99 train shards (~9.85B tokens)
    python data/download_fineweb_edu.py 8          # val shard + the first 8 train shards

Shards already complete (valid header and size) are skipped; every file is verified.
"""
import argparse
import os
import sys

from tqdm import tqdm

from shards import ShardError, read_header

REPO = "kjj0/finewebedu10B-gpt2"
N_TRAIN = 99  # finewebedu_train_000001.bin ... _000099.bin, 100M tokens each


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("num_shards", nargs="?", type=int, default=N_TRAIN, help="train shards to fetch (1..99)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb_edu"))
    ap.add_argument("--repo", default=REPO)
    args = ap.parse_args(argv)
    if not 1 <= args.num_shards <= N_TRAIN:
        ap.error(f"num_shards must be between 1 and {N_TRAIN}, got {args.num_shards}")

    from huggingface_hub import hf_hub_download

    names = ["finewebedu_val_000000.bin"] + [f"finewebedu_train_{i:06d}.bin" for i in range(1, args.num_shards + 1)]
    os.makedirs(args.out, exist_ok=True)
    for name in tqdm(names, desc="shards", unit="shard"):
        path = os.path.join(args.out, name)
        if os.path.exists(path):
            try:
                read_header(path)
                continue  # complete
            except ShardError as e:
                tqdm.write(f"re-downloading: {e}")
                os.remove(path)
        try:
            hf_hub_download(repo_id=args.repo, filename=name, repo_type="dataset", local_dir=args.out)
        except Exception as e:
            sys.exit(f"could not download {name} from the dataset repo {args.repo}: {type(e).__name__}: {e}")
        try:
            n = read_header(path)
        except ShardError as e:
            sys.exit(f"the download of {name} is broken ({e}); run the command again to retry it")
        tqdm.write(f"{name}: {n:,} tokens")
    print(f"done: {len(names)} shards in {args.out}")


if __name__ == "__main__":
    main()
