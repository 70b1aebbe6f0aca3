"""Download SQuAD v2.0 (rajpurkar/squad_v2) or v1.1 (rajpurkar/squad) with `datasets` into
data/squad/<task>/<split>.jsonl in the Hub schema (id, title, context, question,
answers{text, answer_start}), which finetuner.py reads.

    python data/download_squad.py            # v2.0 -> data/squad/squad_v2/
    python data/download_squad.py --v1       # v1.1 -> data/squad/squad/
"""
import argparse
import os

from hub_jsonl import download_to_jsonl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v1", action="store_true", help="SQuAD v1.1 instead of v2.0")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "squad"))
    args = ap.parse_args(argv)
    name, task = ("rajpurkar/squad", "squad") if args.v1 else ("rajpurkar/squad_v2", "squad_v2")
    download_to_jsonl(name, None, os.path.join(args.out, task))


if __name__ == "__main__":
    main()
