"""GPT-2 BPE (through tiktoken) plus KBERT's special tokens.

KBERT reads the ready-made GPT-2 FineWeb-EDU shards, so its vocabulary is GPT-2's 50,257
ids, with `<|endoftext|>` (50256) serving as the document start / [CLS]. Three tokens are
added after it and the embedding is padded to 50,304 rows (a multiple of 128):

    50256 [CLS]   document start (GPT-2's <|endoftext|>)
    50257 [MASK]  MLM corruption
    50258 [SEP]   end of a segment in single / pair inputs
    50259 [PAD]   padding; never attended by real tokens (it forms its own "document")
"""
import functools
import json
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


BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # where tiktoken downloads them from


def missing_bpe_message(error: Exception) -> str:
    """One line: why GPT-2's BPE files could not be loaded and how to install them offline."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or "tiktoken's default cache (TIKTOKEN_CACHE_DIR is not set)"
    why = " ".join(f"{type(error).__name__}: {error}".split())[:160]
    return (f"cannot load GPT-2's BPE files: they are not in {cache} and tiktoken could not download them ({why}). "
            f"Get vocab.bpe and encoder.json from {BPE_URL} (or copy them from a machine that has them) into a folder DIR, "
            "then run `python -c \"import tokenizer; tokenizer.install_offline_bpe('DIR', '.cache/tiktoken')\"` in the repo "
            "and `export TIKTOKEN_CACHE_DIR=$PWD/.cache/tiktoken` (README: Quick start)")


class Tokenizer:
    """Encodes text for KBERT: single texts `[CLS] a [SEP]`, pairs `[CLS] a [SEP] b [SEP]`,
    batches, decoding, and per-token character offsets for span extraction."""

    # the special ids under transformers' tokenizer names, so that code taking either tokenizer
    # reads both the same way (evals.blimp_scores)
    cls_token_id, sep_token_id, mask_token_id, pad_token_id = CLS_ID, SEP_ID, MASK_ID, PAD_ID
    all_special_ids = list(SPECIAL_IDS)

    def __init__(self):
        try:
            self.bpe = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises requests/urllib errors of many kinds
            raise RuntimeError(missing_bpe_message(e)) from None
        assert self.bpe.n_vocab == CLS_ID + 1, self.bpe.n_vocab
        self.vocab_size = VOCAB_SIZE

    def encode_ordinary(self, text: str) -> list[int]:
        """BPE ids of `text`, no special tokens (special strings are treated as text)."""
        return self.bpe.encode_ordinary(text)

    def encode(self, text: str, pair: str | None = None, max_len: int | None = None) -> list[int]:
        """`[CLS] text [SEP]` or `[CLS] text [SEP] pair [SEP]`, at most max_len tokens: the longer
        segment is cut first ("longest first", as Hugging Face tokenizers does it)."""
        a = self.encode_ordinary(text)
        b = self.encode_ordinary(pair) if pair is not None else None
        if max_len is not None:
            budget = max_len - (3 if b is not None else 2)
            if budget < 2:
                raise ValueError(f"max_len={max_len} leaves no room for text")
            if b is None:
                a = a[:budget]
            elif len(a) + len(b) > budget:
                # the shorter segment (a on a tie) keeps at most half the budget, the longer one
                # the rest: Hugging Face tokenizers' rule (utils/truncation.rs), so an export's
                # AutoTokenizer with truncation=True cuts the same tokens
                short = min(len(a), len(b), budget // 2)
                a, b = (a[:short], b[:budget - short]) if len(a) <= len(b) else (a[:budget - short], b[:short])
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


# ----------------------------------------------------------------------------------------
# The same tokenizer for Hugging Face transformers (written into every export)


@functools.cache
def _gpt2_vocab_and_merges() -> tuple[dict, list]:
    """GPT-2's byte-level BPE in the tokenizers library's terms, rebuilt from tiktoken's ranks
    (no download): vocab {token string: id} and the merges in rank order. Token bytes are
    spelled with GPT-2's bytes_to_unicode alphabet; the merge that makes token r is the split
    left by running BPE on its bytes with the ranks below r (tiktoken's _educational.py does
    the same), so merge i makes token 256 + i as in GPT-2's vocab.bpe."""
    bpe = Tokenizer().bpe
    ranks = {bpe.decode_single_token_bytes(i): i for i in range(CLS_ID)}
    # GPT-2's bytes_to_unicode (openai/gpt-2, src/encoder.py): printable bytes stand for themselves, the
    # others for the characters from 256 on, in byte order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) if b in printable else chr(256 + sum(c not in printable for c in range(b))) for b in range(256)}

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    def split(token: bytes, below: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 1:
            pairs = [(ranks.get(parts[i] + parts[i + 1], below), i) for i in range(len(parts) - 1)]
            rank, i = min(pairs)
            if rank >= below:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    merges = [tuple(spell(p) for p in split(token, rank)) for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(token) > 1]
    return {spell(token): rank for token, rank in ranks.items()}, merges


def save_hf_tokenizer(folder: str, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json into folder: a fast tokenizer for
    `AutoTokenizer.from_pretrained(folder)` that encodes like Tokenizer.encode (tests/test_export.py
    checks it on real texts). GPT-2's pre-tokenizer regex is ByteLevel's own; [MASK] takes the
    space before it (lstrip, like RoBERTa's <mask>), so "is [MASK]." asks for " Paris"."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _gpt2_vocab_and_merges()
    names = {"[CLS]": CLS_ID, "[MASK]": MASK_ID, "[SEP]": SEP_ID, "[PAD]": PAD_ID}  # [CLS] replaces <|endoftext|>
    tok = HFTokenizer(models.BPE(vocab={**vocab, **names}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token=AddedToken("[MASK]", lstrip=True, rstrip=False, normalized=False, special=True),
        model_max_length=model_max_length, model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False)
    assert [hf.convert_tokens_to_ids(n) for n in names] == list(names.values()), "special token ids moved"
    hf.save_pretrained(folder)
    # transformers 5 records its own name for the class, TokenizersBackend, which transformers 4 does not know: name
    # the plain fast tokenizer that both load (4 then reads no config.json, so it asks nothing about remote code)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
