"""The token shard format of modded-nanogpt (and kjj0/finewebedu10B-gpt2):
a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros),
then the tokens as little-endian uint16. Every document starts with 50256 (<|endoftext|>).
"""
import os

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
    pass


def write_shard(path: str, tokens) -> None:
    """Write atomically: a partial file never carries the final name."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ShardError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_header(path: str) -> int:
    """Validate the header and the file size; return the token count."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) >= 4 and int.from_bytes(head[:4], "little") != MAGIC:  # e.g. a .jsonl given where shards go
        raise ShardError(f"{path}: magic number {int.from_bytes(head[:4], 'little', signed=True)} is not {MAGIC}; not a "
                         "token shard (text such as .jsonl, .txt or .parquet becomes shards with data/tokenize_text.py)")
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header (truncated download?)")
    header = np.frombuffer(head, dtype="<i4")
    if header[1] != VERSION:
        raise ShardError(f"{path}: shard version {header[1]} is not supported (expected {VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        raise ShardError(f"{path}: header promises {n} tokens ({expected} bytes) but the file has {size} bytes; "
                         "delete it and download or tokenize it again")
    return n


def check_token_range(tokens, path: str, vocab_size: int) -> None:
    """Raise at the first id >= vocab_size, which would otherwise fail deep inside the
    embedding. One vectorised max (~10 ms per 100M tokens in the page cache); only a
    failing shard is searched for the position."""
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"{path}: token id {int(tokens[pos])} at position {pos} is not below the vocabulary size "
                         f"{vocab_size} (another tokenizer's shard, or corrupt); re-tokenize its source with "
                         "data/tokenize_text.py")


def open_shard(path: str, vocab_size: int | None = None) -> np.memmap:
    """Tokens of a shard as a read-only uint16 memmap (nothing is loaded up front);
    with vocab_size every id is checked to be below it (this reads the whole shard)."""
    n = read_header(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    if vocab_size is not None:
        check_token_range(tokens, path, vocab_size)
    return tokens
