"""Tokenizer round trips, special tokens and character offsets, on the real GPT-2 BPE."""
import pytest

import tokenizer
from tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID

TEXTS = ["Hello world!", "  leading spaces and\nnewlines\t", "naïve café — 日本語 😀", ""]


def test_round_trip_and_specials(tok):
    for t in TEXTS:
        assert tok.decode(tok.encode_ordinary(t)) == t
        ids = tok.encode(t)
        assert ids[0] == CLS_ID and ids[-1] == SEP_ID and tok.decode(ids) == t
    assert tok.encode_ordinary("Hello world") == [15496, 995]  # the real GPT-2 ids
    assert len({CLS_ID, MASK_ID, SEP_ID, PAD_ID}) == 4 and max(CLS_ID, MASK_ID, SEP_ID, PAD_ID) < tok.vocab_size
    assert tok.vocab_size == 50304 and tok.vocab_size % 128 == 0
    assert tok.decode([CLS_ID, 15496, MASK_ID], skip_special=False) == "[CLS]Hello[MASK]"


def test_pairs_batches_and_truncation(tok):
    ids = tok.encode("The cat sat.", "A cat was sitting.")
    assert ids.count(SEP_ID) == 2 and ids[0] == CLS_ID
    batch = tok.encode_batch(["a b c d e f g", "x"], ["y z", "w"], max_len=8)
    assert all(len(b) <= 8 for b in batch)
    assert batch[1] == tok.encode("x", "w")
    with pytest.raises(ValueError):
        tok.encode_batch(["a"], ["b", "c"])
    docs = tok.encode_documents(["one", "two three"])
    assert docs[0][0] == CLS_ID and tok.decode(docs[1]) == "two three"


def test_offsets_cover_text(tok):
    for t in TEXTS[:3]:
        ids, spans = tok.encode_with_offsets(t)
        assert len(ids) == len(spans)
        assert "".join(t[s:e] for s, e in spans) == t  # contiguous, complete, in order
        for i, (s, e) in enumerate(spans):  # a token made of whole characters spans exactly its text
            try:
                text = tok.bpe.decode_single_token_bytes(ids[i]).decode("utf-8")
            except UnicodeDecodeError:  # part of a multi-byte character
                continue
            assert t[s:e] == text
    ids, spans = tok.encode_with_offsets("The answer is Paris.")
    words = [("The answer is Paris."[s:e]) for s, e in spans]
    assert words == ["The", " answer", " is", " Paris", "."]


def test_missing_bpe_files_give_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        tokenizer.Tokenizer()
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        tokenizer.install_offline_bpe(str(tmp_path / "nowhere"), str(tmp_path / "cache"))
