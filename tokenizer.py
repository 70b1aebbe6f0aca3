"""GPT-2 BPE (through tiktoken) plus KBERT's special tokens.

KBERT reads the ready-made GPT-2 FineWeb-EDU shards, so its vocabulary is GPT-2's 50,257
ids, with `<|endoftext|>` (50256) serving as the document start / [CLS]. Three tokens are
added after it and the embedding is padded to 50,304 rows (a multiple of 128):

    50256 [CLS]   document start (GPT-2's <|endoftext|>)
    50257 [MASK]  MLM corruption
    50258 [SEP]   end of a segment in single / pair inputs
    50259 [PAD]   padding; never attended by real tokens (it forms its own "document")
"""
import os
import shutil

import tiktoken

CLS_ID = 50256
MASK_ID = 50257
SEP_ID = 50258
PAD_ID = 50259
SPECIAL_IDS = (CLS_ID, MASK_ID, SEP_ID, PAD_ID)
VOCAB_SIZE = 50304  # 50,257 GPT-2 ids + 3 specials, padded to a multiple of 128

# tiktoken caches each BPE file under the sha1 of its download URL.
BPE_CACHE_NAMES = {
    "vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
    "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
}


def install_offline_bpe(src_dir: str, cache_dir: str) -> None:
    """Copy GPT-2's vocab.bpe and encoder.json into a tiktoken cache folder, so that
    `tiktoken.get_encoding("gpt2")` works offline once TIKTOKEN_CACHE_DIR=cache_dir."""
    os.makedirs(cache_dir, exist_ok=True)
    for name, sha in BPE_CACHE_NAMES.items():
        src = os.path.join(src_dir, name)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src} is missing: the folder must hold vocab.bpe and encoder.json")
        dst = os.path.join(cache_dir, sha)
        if not os.path.exists(dst):
            shutil.copyfile(src, dst)


class Tokenizer:
    """Encodes text for KBERT: single texts `[CLS] a [SEP]`, pairs `[CLS] a [SEP] b [SEP]`,
    batches, decoding, and per-token character offsets for span extraction."""

    def __init__(self):
        try:
            self.bpe = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises requests/urllib errors of many kinds
            raise RuntimeError(
                f"cannot load GPT-2's BPE files ({type(e).__name__}: {e}). tiktoken downloads them (network access) "
                "or reads them from the folder named by TIKTOKEN_CACHE_DIR. Offline: with GPT-2's vocab.bpe and "
                "encoder.json in SRC_DIR, run `python -c \"import tokenizer; tokenizer.install_offline_bpe('SRC_DIR', "
                "'CACHE_DIR')\"` from the repo root and set TIKTOKEN_CACHE_DIR=CACHE_DIR"
            ) from None
        assert self.bpe.n_vocab == CLS_ID + 1, self.bpe.n_vocab
        self.vocab_size = VOCAB_SIZE

    def encode_ordinary(self, text: str) -> list[int]:
        """BPE ids of `text`, no special tokens (special strings are treated as text)."""
        return self.bpe.encode_ordinary(text)

    def encode(self, text: str, pair: str | None = None, max_len: int | None = None) -> list[int]:
        """`[CLS] text [SEP]` or `[CLS] text [SEP] pair [SEP]`. With max_len the longer
        segment is truncated first (the usual "longest first" rule)."""
        a = self.encode_ordinary(text)
        b = self.encode_ordinary(pair) if pair is not None else None
        if max_len is not None:
            budget = max_len - (3 if b is not None else 2)
            if budget < 2:
                raise ValueError(f"max_len={max_len} leaves no room for text")
            if b is None:
                a = a[:budget]
            else:
                while len(a) + len(b) > budget:
                    if len(a) >= len(b):
                        a.pop()
                    else:
                        b.pop()
        ids = [CLS_ID] + a + [SEP_ID]
        if b is not None:
            ids += b + [SEP_ID]
        return ids

    def encode_batch(self, texts: list[str], pairs: list[str] | None = None, max_len: int | None = None) -> list[list[int]]:
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"encode_batch: {len(texts)} texts but {len(pairs)} pairs")
        return [self.encode(t, pairs[i] if pairs is not None else None, max_len) for i, t in enumerate(texts)]

    def encode_documents(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Pretraining format: every document is `[CLS] tokens`, like the GPT-2 shards."""
        return [[CLS_ID] + ids for ids in self.bpe.encode_ordinary_batch(texts, num_threads=num_threads)]

    def decode(self, ids, skip_special: bool = True) -> str:
        names = {CLS_ID: "[CLS]", MASK_ID: "[MASK]", SEP_ID: "[SEP]", PAD_ID: "[PAD]"}
        out, run = [], []
        for i in ids:
            i = int(i)
            if i < CLS_ID:
                run.append(i)
                continue
            if run:
                out.append(self.bpe.decode(run))
                run = []
            if not skip_special:
                out.append(names.get(i, f"[UNUSED{i}]"))
        if run:
            out.append(self.bpe.decode(run))
        return "".join(out)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """BPE ids of `text` and each token's [start, end) character span in `text`.
        A character split over several byte-level tokens belongs to the last of them;
        the earlier ones get an empty span."""
        ids = self.encode_ordinary(text)
        decoded, starts = self.bpe.decode_with_offsets(ids)
        if decoded != text:  # only for invalid UTF-8 input, which Python str cannot hold
            raise ValueError("BPE round trip changed the text; offsets would be wrong")
        return ids, list(zip(starts, starts[1:] + [len(text)]))
