"""Download GLUE tasks (nyu-mll/glue) with `datasets` into data/glue/<task>/<split>.jsonl
(the Hub schema: text fields, label, idx), which finetuner.py reads.

    python data/download_glue.py mnli        # one task
    python data/download_glue.py all         # every task (ax included)
"""
import argparse
import json
import os
import sys

from tqdm import tqdm

TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "ax"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=TASKS + ["all"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "glue"))
    args = ap.parse_args(argv)
    from datasets import load_dataset

    for task in TASKS if args.task == "all" else [args.task]:
        try:
            ds = load_dataset("nyu-mll/glue", task)
        except Exception as e:
            sys.exit(f"could not load nyu-mll/glue/{task}: {type(e).__name__}: {e}")
        folder = os.path.join(args.out, task)
        os.makedirs(folder, exist_ok=True)
        for split, rows in ds.items():
            path = os.path.join(folder, f"{split}.jsonl")
            if os.path.exists(path):
                print(f"{path} exists, skipping")
                continue
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                for row in tqdm(rows, desc=f"{task}/{split}", unit="ex"):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(path + ".tmp", path)
            print(f"{path}: {len(rows):,} rows")


if __name__ == "__main__":
    main()
