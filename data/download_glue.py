"""Download GLUE tasks (nyu-mll/glue) with `datasets` into data/glue/<task>/<split>.jsonl
(the Hub schema: text fields, label, idx), which finetuner.py reads.

    python data/download_glue.py mnli        # one task
    python data/download_glue.py all         # every task (ax included)
"""
import argparse
import os

from hub_jsonl import download_to_jsonl

TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "ax"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=TASKS + ["all"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "glue"))
    args = ap.parse_args(argv)
    for task in TASKS if args.task == "all" else [args.task]:
        download_to_jsonl("nyu-mll/glue", task, os.path.join(args.out, task))


if __name__ == "__main__":
    main()
