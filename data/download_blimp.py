"""Download BLiMP (Warstadt et al., TACL 2020; the Hub's nyu-mll/blimp, one config of 1,000
minimal pairs per paradigm) with `datasets` into data/blimp/blimp.jsonl, one pair a line in
the schema of the authors' files: {UID, field, linguistics_term, pairID, sentence_good,
sentence_bad}. `finetuner.py --task blimp` reads it.

    python data/download_blimp.py
"""
import argparse
import json
import os
import sys

from tqdm import tqdm

HUB_ID = "nyu-mll/blimp"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "blimp", "blimp.jsonl"))
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        print(f"{args.out} exists, skipping")
        return
    import datasets

    try:
        configs = datasets.get_dataset_config_names(HUB_ID)
        paradigms = [datasets.load_dataset(HUB_ID, c)["train"] for c in tqdm(configs, desc="blimp", unit="paradigm")]
    except Exception as e:
        sys.exit(f"could not load {HUB_ID}: {type(e).__name__}: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n = 0
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:  # the final name only once complete
        for rows in paradigms:
            for row in rows:
                # the Hub renamed the authors' pairID (a string) to pair_id (an int)
                f.write(json.dumps({"UID": row["UID"], "field": row["field"], "linguistics_term": row["linguistics_term"],
                                    "pairID": str(row["pair_id"]), "sentence_good": row["sentence_good"],
                                    "sentence_bad": row["sentence_bad"]}, ensure_ascii=False) + "\n")
                n += 1
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.out}: {len(paradigms)} paradigms, {n:,} pairs")


if __name__ == "__main__":
    main()
