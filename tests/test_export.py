"""Exports as Hugging Face models (issue 12): the folders that trainer.py and finetuner.py write
load in transformers' auto classes and pipelines (trust_remote_code=True, offline, on CPU) and
give this repo's own outputs on the same ids; the tokenizer they carry encodes like
tokenizer.py on real texts; the repo's loaders read new and old exports; files are readable by
other users. Real exports: a 2-step tiny pretraining run and tiny finetuning runs on it."""
import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification, AutoTokenizer, pipeline)

import common
import evals
import finetuner
import tokenizer
import trainer
from conftest import SHARED, shared_path
from data.shards import write_shard
from model import CLS_ID, MASK_ID, PAD_ID, SEP_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE = dict(trust_remote_code=True)
FILES = ["README.md", "config.json", "hf_kbert.py", "model.py", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def in_dir(folder, fn, *args):
    old = os.getcwd()
    os.chdir(folder)
    try:
        return fn(*args)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tok):
    """trainer.main, 2 steps of the tiny preset on synthetic shards, exported under umask 077
    (what a cautious user's shell may set): the export must still be readable by others."""
    tmp = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[CLS_ID], rng.integers(0, CLS_ID, int(n))]) for n in rng.integers(20, 300, 60)]
    write_shard(str(tmp / "syn_train_000001.bin"), np.concatenate(docs[:50]))
    write_shard(str(tmp / "syn_val_000000.bin"), np.concatenate(docs[50:]))
    args = ["--model.preset", "tiny", "--data.train_files", f"{tmp}/syn_train_*.bin", "--data.val_files", f"{tmp}/syn_val_*.bin",
            "--data.seq_len", "128", "--train.batch_tokens", "512", "--train.micro_batch_seqs", "4", "--train.steps", "2",
            "--train.val_every", "0", "--train.val_tokens", "512", "--train.save_every", "0", "--train.run_id", "pre",
            "--train.checkpoint_dir", f"{tmp}/ck", "--train.export_dir", f"{tmp}/ex", "--train.local_window_start", "32",
            "--train.global_window_start", "64", "--train.global_window_end", "128"]
    mask = os.umask(0o077)
    try:
        out = in_dir(tmp, trainer.main, args)
    finally:
        os.umask(mask)
    return out["export"]


@pytest.fixture(scope="module")
def kbert(pretrained):
    """The same export through the repo's own loader."""
    return trainer.load_encoder(pretrained)[0].eval()


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    """finetuner.main on the pretrained export (--train.base_model) for a 3-class task (MNLI),
    regression (STS-B, synthetic rows) and SQuAD v2: 1 epoch of a few examples each.
    Returns {task: (model folder, eval rows, the run's config)}."""
    tmp = tmp_path_factory.mktemp("ft")
    mnli = tmp / "mnli.jsonl"
    mnli.write_text("".join(open(shared_path("data", "glue", "mnli", "validation_matched.jsonl")).readlines()[:16]))
    squad = tmp / "squad.jsonl"
    squad.write_text("".join(open(shared_path("data", "squad_v2", "validation.jsonl")).readlines()[:6]))
    rng = np.random.default_rng(0)
    stsb = tmp / "stsb.jsonl"
    stsb.write_text("".join(json.dumps({"sentence1": f"A cat sat on mat number {i}.", "sentence2": "A cat " * int(rng.integers(1, 6)),
                                        "label": float(rng.uniform(0, 5)), "idx": i}) + "\n" for i in range(16)))
    common_args = ["--train.base_model", pretrained, "--train.epochs", "1", "--train.batch_size", "8", "--train.lr", "3e-3",
                   "--train.log_every", "100"]
    runs = {"mnli": (mnli, ["--train.pack_len", "256", "--train.max_len", "128"]),
            "stsb": (stsb, ["--train.pack_len", "256", "--train.max_len", "128"]),
            "squad_v2": (squad, ["--train.squad_max_len", "256", "--train.doc_stride", "64"])}
    out = {}
    for task, (data, extra) in runs.items():
        args = ["--task", task, "--train.train_file", str(data), "--train.eval_files", str(data),
                "--train.run_id", task] + common_args + extra
        in_dir(tmp, finetuner.main, args)
        cfg = finetuner.FinetuneConfig(**common.parse_overrides(args[2:], finetuner.GROUPS)[0]["train"])
        out[task] = (str(tmp / "finetuned" / task / "seed0" / "model"), evals.read_jsonl(str(data)), cfg)
    return out


def max_diff(a, b) -> float:
    """Largest absolute difference; equal entries count 0 (both -inf: the logits of ids that are
    never targets), and a nan anywhere counts inf (max(0.0, nan) would have hidden it)."""
    d = (a.double() - b.double()).abs().masked_fill(a == b, 0.0)
    return float("inf") if d.isnan().any() else d.max().item()


# -- the folder ----------------------------------------------------------------------------


def test_export_is_a_hub_folder_readable_by_others_with_a_card_that_runs(pretrained, capsys):
    assert sorted(os.listdir(pretrained)) == sorted(FILES + ["metrics.json"])  # the trainer's metrics beside the model
    modes = {name: stat.S_IMODE(os.stat(os.path.join(pretrained, name)).st_mode) for name in FILES + ["metrics.json"]}
    assert stat.S_IMODE(os.stat(pretrained).st_mode) == 0o755 and set(modes.values()) == {0o644}, modes  # umask was 077
    for name in common.EXPORT_CODE:  # the remote code is the repo's own, byte for byte
        assert open(os.path.join(pretrained, name)).read() == open(os.path.join(ROOT, name)).read()
    config = json.load(open(os.path.join(pretrained, "config.json")))
    assert config["model_type"] == "kbert" and config["architectures"] == ["KBertForMaskedLM"]
    assert config["auto_map"] == common.AUTO_MAP and config["n_layer"] == 4 and config["d_model"] == 64
    assert config["kbert"]["tokens_seen"] == 1024 and config["kbert"]["val_loss"] > 0
    from safetensors import safe_open

    with safe_open(os.path.join(pretrained, "model.safetensors"), "pt") as f:
        assert all(k.startswith("kbert.") for k in f.keys())
    card = open(os.path.join(pretrained, "README.md")).read()
    for fact in ("parameters: 3,4", "tokens seen: 1,024", "validation loss: 1", "library_name: transformers",
                 "To score it on BLiMP: `python finetuner.py --task blimp"):
        assert fact in card, fact
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    print(code)
    exec(code, {})  # the card's own instructions: fill-mask pipeline and AutoModel on a padded batch
    assert "'token_str'" in capsys.readouterr().out


def test_model_and_optimizer_import_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\nimport model, optimizer\n"
            "try:\n    import hf_kbert\nexcept ImportError:\n    print('hf_kbert needs transformers')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "hf_kbert needs transformers" in r.stdout, r.stderr


# -- the pretrained model in transformers ----------------------------------------------------


TEXTS = ["The capital of France is Paris.", "Hi", "A longer sentence, with a comma, and a few more words than the others.", "ok ok"]


def test_auto_classes_equal_kbert_with_and_without_padding(pretrained, kbert, tok, monkeypatch):
    """AutoModel's hidden states and AutoModelForMaskedLM's logits equal KBERT's on each text
    alone, in padded batches (right and left): padded positions neither attend (their outputs
    ignore the real tokens) nor are attended (whatever ids they hold). On CPU: SDPA."""
    config = AutoConfig.from_pretrained(pretrained, **REMOTE)
    assert config.model_type == "kbert" and config.hidden_size == 64 and config.num_hidden_layers == 4
    base = AutoModel.from_pretrained(pretrained, **REMOTE)
    mlm = AutoModelForMaskedLM.from_pretrained(pretrained, **REMOTE)
    assert not base.training and base.kbert.attn_backend == "auto"
    hf_tok = AutoTokenizer.from_pretrained(pretrained, **REMOTE)
    model_py = sys.modules[type(base.kbert).__module__]  # the export's copy of model.py, as transformers imported it
    monkeypatch.setattr(model_py, "flex_attention", None)  # on CPU the SDPA path runs: calling FlexAttention would fail
    diffs = {"hidden": 0.0, "logits": 0.0}
    with torch.no_grad():
        refs = [kbert(torch.tensor([tok.encode(t)])) for t in TEXTS]
        for side in ("right", "left"):
            hf_tok.padding_side = side
            batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
            h, logits = base(**batch).last_hidden_state, mlm(**batch).logits
            for i, ref in enumerate(refs):
                real = batch["attention_mask"][i].bool()
                assert batch["input_ids"][i][real].tolist() == tok.encode(TEXTS[i])
                diffs["hidden"] = max(diffs["hidden"], max_diff(h[i, real], ref[0]))
                diffs["logits"] = max(diffs["logits"], max_diff(logits[i, real], kbert.mlm_logits(ref[0])))
            noisy = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, MASK_ID)  # other ids where padded
            assert torch.equal(base(input_ids=noisy, attention_mask=batch["attention_mask"]).last_hidden_state, h)
            changed = batch["input_ids"].clone()
            changed[batch["attention_mask"].bool() & (changed < CLS_ID)] = 11  # other real tokens
            pads = batch["attention_mask"] == 0
            assert torch.equal(base(input_ids=changed, attention_mask=batch["attention_mask"]).last_hidden_state[pads], h[pads])
        ids = torch.tensor([tok.encode(TEXTS[0])] * 2)  # no padding, no mask
        diffs["unpadded"] = max_diff(base(ids).last_hidden_state, kbert(ids))
        labels = torch.full_like(ids, -100)
        labels[:, 3] = ids[:, 3]
        loss = mlm(input_ids=ids, labels=labels).loss  # -100: not predicted (transformers' convention)
        assert abs(loss.item() - kbert.mlm_loss(kbert(ids), labels)[0].item()) < 1e-5
    print(f"max |transformers - KBERT|: {diffs}")
    assert max(diffs.values()) <= 1e-5


def test_flex_attention_path_pads_to_whole_blocks(pretrained, kbert):
    """On CUDA the wrapper runs model.py's FlexAttention path, which takes whole 128-token
    blocks: forced here on CPU (eager FlexAttention runs forward there), a padded batch of 37
    tokens gives the SDPA outputs."""
    base = AutoModel.from_pretrained(pretrained, **REMOTE)
    ids = torch.randint(0, CLS_ID, (2, 37))
    ids[:, 0] = CLS_ID
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.no_grad():
        sdpa = base(ids, attention_mask=mask).last_hidden_state
        base.kbert.attn_backend = "flex"
        flex = base(ids, attention_mask=mask).last_hidden_state
    print(f"max |flex - sdpa| {max_diff(flex[mask.bool()], sdpa[mask.bool()]):.2e}")
    assert max_diff(flex[mask.bool()], sdpa[mask.bool()]) <= 1e-5


def test_new_heads_and_models_from_a_config_start_as_model_py_initialises_them(pretrained, kbert):
    """A task head that the export lacks (finetuning in transformers from the pretrained export)
    starts as the finetuner's does (zero output layer), the encoder as exported; a model built
    from the config alone gets model.py's initialisation."""
    cls = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=3, **REMOTE)
    qa = AutoModelForQuestionAnswering.from_pretrained(pretrained, **REMOTE)
    assert cls.config.num_labels == 3 and cls.head.n_labels == 3
    for head in (cls.head, qa.head):
        assert not head.out.weight.any() and not head.out.bias.any()
    bound = 1 / np.sqrt(kbert.cfg.d_model)  # nn.Linear's default, as in ClassificationHead
    assert 0 < cls.head.dense.weight.abs().max() <= bound and cls.head.dense.weight.isfinite().all()
    assert all(torch.equal(p, q) for p, q in zip(cls.kbert.state_dict().values(), kbert.state_dict().values()))
    fresh = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(pretrained, **REMOTE), **REMOTE)
    block = fresh.kbert.blocks[0]
    assert not block.attn.proj.weight.any() and abs(block.attn.qkv.weight.std().item() - 0.5 * bound) < 0.01
    assert torch.equal(fresh.kbert.rotary.freqs, kbert.rotary.freqs)


def test_fill_mask_pipeline_agrees_with_kbert(pretrained, kbert, tok):
    fill = pipeline("fill-mask", model=pretrained, **REMOTE)
    out = fill("The capital of France is [MASK].", top_k=3)
    print(out)
    ids = [CLS_ID] + tok.encode_ordinary("The capital of France is") + [MASK_ID] + tok.encode_ordinary(".") + [SEP_ID]
    assert fill.tokenizer("The capital of France is [MASK].")["input_ids"] == ids  # [MASK] took the space before it
    with torch.no_grad():
        probs = kbert.mlm_logits(kbert(torch.tensor([ids]))[0, ids.index(MASK_ID)]).softmax(-1)
    top = probs.topk(3)
    assert [o["token"] for o in out] == top.indices.tolist()
    assert np.allclose([o["score"] for o in out], top.values.tolist(), atol=1e-6)


# -- the tokenizer -----------------------------------------------------------------------------


def test_gpt2_bpe_rebuilt_from_tiktoken_equals_the_original_files(tok):
    vocab, merges = tokenizer._gpt2_vocab_and_merges()
    src = shared_path("tokenizers", "gpt2")
    original = json.load(open(src / "encoder.json"))
    assert vocab == {t: i for t, i in original.items() if i < CLS_ID}  # <|endoftext|> becomes [CLS]
    assert merges == [tuple(line.split()) for line in open(src / "vocab.bpe").read().splitlines()[1:] if line]


def test_the_tokenizer_is_a_plain_fast_tokenizer_that_needs_no_remote_code(pretrained, monkeypatch):
    """tokenizer_config.json names PreTrainedTokenizerFast (transformers 5 wrote its own alias
    TokenizersBackend, unknown to transformers 4): it loads as that class with no question
    about remote code. AutoTokenizer of transformers 5 reads the model's config.json (custom
    code) first, so it still asks unless given trust_remote_code (False is enough)."""
    from transformers import PreTrainedTokenizerFast

    config = json.load(open(os.path.join(pretrained, "tokenizer_config.json")))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail(f"asked: {args}"))
    plain = PreTrainedTokenizerFast.from_pretrained(pretrained)
    auto = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=False)
    assert type(auto) is type(plain) and plain.is_fast
    assert plain("Use the [MASK] keyword.")["input_ids"] == auto("Use the [MASK] keyword.")["input_ids"]
    assert plain.mask_token_id == MASK_ID and plain("a", "b")["input_ids"][0] == CLS_ID


def test_autotokenizer_encodes_like_tokenizer_py_on_real_texts(pretrained, tok):
    """AutoTokenizer on real single texts and pairs from ../shared, with and without truncation,
    gives Tokenizer.encode's ids. It needs no remote code: trust_remote_code=False only spares
    the question transformers 5 asks (and waits 15 s for in a terminal) about the model's config."""
    hf = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=False)
    assert hf.is_fast and len(hf) == CLS_ID + 4
    assert (hf.cls_token_id, hf.mask_token_id, hf.sep_token_id, hf.pad_token_id) == (CLS_ID, MASK_ID, SEP_ID, PAD_ID)
    read = lambda *p: [json.loads(line) for line in open(shared_path(*p))]
    prose = [r["text"][:1500] for name in ("python_docs", "us_presidential_speeches") for r in read("data", "prose", f"{name}.jsonl")]
    if (SHARED / "data" / "fineweb_edu" / "sample.jsonl").exists():
        prose += [r["text"][:1500] for r in read("data", "fineweb_edu", "sample.jsonl")]
    mnli = read("data", "glue", "mnli", "validation_matched.jsonl")[:1000]
    squad = read("data", "squad_v2", "validation.jsonl")
    singles = prose + list(dict.fromkeys(r["context"] for r in squad))[:400]  # distinct SQuAD paragraphs
    squad = squad[:1000]
    cases = {  # name: (texts, pairs, max_len)
        "single texts": (singles, None, None), "single texts cut to 64": (singles[:500], None, 64),
        "MNLI premise/hypothesis": ([r["premise"] for r in mnli], [r["hypothesis"] for r in mnli], None),
        "MNLI pairs cut to 24 and 25": ([r["premise"] for r in mnli], [r["hypothesis"] for r in mnli], (24, 25)),
        "SQuAD question/context": ([r["question"] for r in squad], [r["context"] for r in squad], None)}
    specials = re.compile(r"\[(CLS|MASK|SEP|PAD)\]")  # typed in text, these are special tokens to transformers
    report, wrong = {}, []
    for name, (texts, pairs, max_len) in cases.items():
        keep = [i for i in range(len(texts)) if not specials.search(texts[i] + (pairs[i] if pairs else ""))]
        assert len(keep) == len(texts), f"{name}: {len(texts) - len(keep)} texts hold a literal special token"
        agree = 0
        for n in (max_len if isinstance(max_len, tuple) else (max_len,)):
            kw = dict(truncation=True, max_length=n) if n else {}
            got = hf(texts, pairs, **kw)["input_ids"] if pairs else hf(texts, **kw)["input_ids"]
            want = tok.encode_batch(texts, pairs, max_len=n)
            agree += sum(g == w for g, w in zip(got, want))
            wrong += [(name, n, i) for i, (g, w) in enumerate(zip(got, want)) if g != w][:3]
        report[name] = f"{agree}/{len(texts) * (len(max_len) if isinstance(max_len, tuple) else 1)}"
    print("AutoTokenizer == tokenizer.py:", report)
    assert not wrong, wrong
    assert len(singles) >= 1000 and len(mnli) == len(squad) == 1000
    assert all(hf.decode(ids, skip_special_tokens=True) == t for ids, t in zip(hf(singles[:200])["input_ids"], singles))


# -- finetuned models --------------------------------------------------------------------------


def test_finetuned_exports_load_with_their_heads_and_predict_as_the_finetuner(finetuned, tok, capsys):
    """AutoModelForSequenceClassification (MNLI: 3 labels, STS-B: regression) and
    AutoModelForQuestionAnswering (SQuAD v2) load the finetuner's exports with their heads,
    labels and problem type; their outputs on tokenizer batches (padded) equal what the
    finetuner computes on its own packed rows and windows, and what it wrote when it ran."""
    runner = lambda task, cfg: finetuner.Runner(task, cfg, common.Dist(0, 0, 1, torch.device("cpu")), print)
    diffs = {}
    for task in ("mnli", "stsb"):
        folder, rows, cfg = finetuned[task]
        model, config = finetuner.load_finetuned(folder)  # the repo's loader
        assert config["task"] == task and config["labels"] == finetuner.LABEL_NAMES[task]
        hf_config = AutoConfig.from_pretrained(folder, **REMOTE)
        assert hf_config.num_labels == finetuner.GLUE[task].n_labels
        assert hf_config.id2label == dict(enumerate(finetuner.LABEL_NAMES[task]))
        assert hf_config.label2id == {n: i for i, n in enumerate(finetuner.LABEL_NAMES[task])}
        assert hf_config.problem_type == ("regression" if task == "stsb" else "single_label_classification")
        hf = AutoModelForSequenceClassification.from_pretrained(folder, **REMOTE)
        hf_tok = AutoTokenizer.from_pretrained(folder, **REMOTE)
        a, b = finetuner.GLUE[task].text_fields
        batch = hf_tok([r[a] for r in rows], [r[b] for r in rows], padding=True, truncation=True, max_length=cfg.max_len,
                       return_tensors="pt")
        with torch.no_grad():
            logits = hf(**batch).logits
        items = finetuner.glue_examples(rows, task, tok, cfg.max_len, "rows")
        r = runner(task, cfg)
        r.prepare(model)
        own = torch.tensor(np.stack(r.predict(model, items)[0]))
        diffs[task] = max_diff(logits, own)
        written = [json.loads(line)["prediction"] for line in open(os.path.join(folder, "..", f"predictions_{task}.jsonl"))]
        if task == "stsb":
            assert np.allclose(logits[:, 0].numpy(), written, atol=1e-5)
        else:
            assert logits.argmax(-1).tolist() == written
    folder, rows, cfg = finetuned["squad_v2"]
    hf_config = AutoConfig.from_pretrained(folder, **REMOTE)
    assert hf_config.architectures == ["KBertForQuestionAnswering"] and hf_config.kbert["task"] == "squad_v2"
    hf = AutoModelForQuestionAnswering.from_pretrained(folder, **REMOTE)
    model, _ = finetuner.load_finetuned(folder)
    feats = finetuner.squad_features(rows, tok, cfg, "rows")
    r = runner("squad_v2", cfg)
    r.prepare(model)
    own = r.predict(model, feats)[0]
    T = max(len(f["ids"]) for f in feats)
    ids = torch.tensor([f["ids"] + [PAD_ID] * (T - len(f["ids"])) for f in feats])
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=(ids != PAD_ID).long())
    diffs["squad_v2"] = max(max_diff(out.start_logits[i, :len(f["ids"])], torch.from_numpy(own[i][0][:len(f["ids"])]))
                            for i, f in enumerate(feats))
    diffs["squad_v2"] = max(diffs["squad_v2"], *(max_diff(out.end_logits[i, :len(f["ids"])], torch.from_numpy(own[i][1][:len(f["ids"])]))
                                                 for i, f in enumerate(feats)))
    print(f"{len(feats)} SQuAD windows; max |transformers - finetuner|: {diffs}")
    assert max(diffs.values()) <= 1e-5
    for task in ("mnli", "squad_v2"):  # each card's transformers code runs as written
        card = open(os.path.join(finetuned[task][0], "README.md")).read()
        code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/this/folder", finetuned[task][0])
        exec(code, {})
    print(capsys.readouterr().out[-300:])


# -- the repo's own loaders ------------------------------------------------------------------------


def test_repo_loaders_read_new_old_and_upgraded_exports(pretrained, kbert, tmp_path, monkeypatch):
    """trainer.load_encoder (and so --train.base_model, which the finetuned fixture used) reads
    the new export; an export in the format before transformers (config {"architecture":
    "KBERT"}, unprefixed weights) still loads and re-exports in the new format."""
    from safetensors.torch import save_file

    config, state = common.load_pretrained(pretrained)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"architecture": "KBERT", "model": config["model"], "tokens_seen": 1024}))
    save_file(state, str(old / "model.safetensors"))
    ids = torch.tensor([[CLS_ID, 15496, 995, SEP_ID]])
    with torch.no_grad():
        want = kbert(ids)
        assert torch.equal(trainer.load_encoder(str(old))[0](ids), want)
        old_config, old_state = common.load_pretrained(str(old))  # how to upgrade an old export:
        common.save_pretrained(str(tmp_path / "upgraded"), old_state, old_config, "card")
        assert sorted(os.listdir(tmp_path / "upgraded")) == FILES
        assert torch.equal(trainer.load_encoder(str(tmp_path / "upgraded"))[0](ids), want)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="not a KBERT export"):
        trainer.load_encoder(str(tmp_path / "other"))
    notes = []  # without GPT-2's BPE files the export is still written, with a note on adding the tokenizer
    monkeypatch.setattr(tokenizer, "save_hf_tokenizer", lambda *a: (_ for _ in ()).throw(RuntimeError("no BPE files")))
    common.save_pretrained(str(tmp_path / "notok"), state, config, "card", log=notes.append)
    assert "tokenizer.json" not in os.listdir(tmp_path / "notok") and "tokenizer.save_hf_tokenizer" in notes[0]
