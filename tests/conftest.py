"""Shared test fixtures. Some tests read reference data (the real GPT-2 BPE files, the SQuAD v2
and MNLI dev sets, public prose, BLiMP) from a folder `shared` beside the repository; where it
is absent those tests skip and say so."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def shared_path(*parts) -> pathlib.Path:
    """A path under ../shared, or a pytest skip naming what is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is not present: this test reads reference data from a folder `shared` beside the repository")
    return p


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The real GPT-2 tokenizer, offline from ../shared/tokenizers/gpt2 when that exists,
    else through tiktoken's own cache or download; skipped when neither works."""
    import tokenizer

    src = SHARED / "tokenizers" / "gpt2"
    if src.is_dir() and not os.environ.get("TIKTOKEN_CACHE_DIR"):
        cache = tmp_path_factory.mktemp("tiktoken")
        tokenizer.install_offline_bpe(str(src), str(cache))
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tokenizer.Tokenizer()
    except RuntimeError as e:
        pytest.skip(f"GPT-2 BPE files unavailable: {e}")
