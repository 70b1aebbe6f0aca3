"""Save a Hugging Face dataset's splits as local jsonl files in the Hub schema."""
import json
import os
import sys

from tqdm import tqdm


def download_to_jsonl(name: str, config: str | None, folder: str) -> None:
    """load_dataset(name, config) -> folder/<split>.jsonl, one row per line; splits already
    written are skipped, and a file only gets its final name once complete."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config)
    except Exception as e:
        sys.exit(f"could not load {name}{'/' + config if config else ''}: {type(e).__name__}: {e}")
    os.makedirs(folder, exist_ok=True)
    for split, rows in ds.items():
        path = os.path.join(folder, f"{split}.jsonl")
        if os.path.exists(path):
            print(f"{path} exists, skipping")
            continue
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for row in tqdm(rows, desc=f"{os.path.basename(folder)}/{split}", unit="row"):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(rows):,} rows")
