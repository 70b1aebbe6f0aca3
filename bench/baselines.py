"""The transformers baselines, in one place for every benchmark (bench/throughput.py,
bench/frontier.py): the models, their published optimizer settings, their MLM loss on
KBERT's packed rows, their FLOP count and their BLiMP log-probabilities.

Recipes, as published (random init; transformers' own classes):
  modernbert  ModernBertForMaskedLM: GeGLU MLP (1.5 d), a global layer every third (the rest a
              sliding window of 128: |i - j| <= 64), no biases, sparse prediction (the
              vocabulary head only on predicted tokens); AdamW betas (0.9, 0.98), eps 1e-6,
              decoupled weight decay 1e-5 (composer's DecoupledAdamW), 30% masking, warm-up over
              0.15% of the tokens (its 3B of 2T), stable, then a linear decay over the last 30% as
              KBERT's (ModernBERT decayed over its last 50B tokens, in a phase of other data and
              length: a decay over 2.5% of a short run would leave it unannealed)
  bert        BertForMaskedLM: GELU MLP (4 d), dropout 0.1, absolute positions; AdamW betas
              (0.9, 0.999), eps 1e-6, weight decay 0.01 (torch's, scaled by the lr), 15% masking
              (80/10/10), warm-up over 1% of the steps (its 10k of 1M) then linear decay to 0,
              gradient clipping at global norm 1.0
Both read KBERT's token ids (GPT-2 BPE + [MASK] [SEP] [PAD], vocabulary 50,304) in KBERT's
packed rows. Documents are kept apart by a block-diagonal attention mask built from the
[CLS] boundaries (ModernBERT: one per layer type, the sliding one also cut to its window),
BERT's positions restart at each document: a packed document gives the outputs it gives
alone (tests/test_frontier.py). The MLM head runs on the predicted positions only, for BERT
too: its loss and gradients are those of BertForMaskedLM's full head, without the rows
that carry no label (ModernBERT's sparse prediction does the same).
"""
import numpy as np
import torch

import trainer
from model import CLS_ID, MASK_ID, PAD_ID, SEP_ID, document_ids

VOCAB = 50304

RECIPES = {
    "modernbert": dict(betas=(0.9, 0.98), eps=1e-6, decoupled_wd=1e-5, wd=0.0, mask=(0.30, 0.1, 0.1), warmup=0.0015,
                       cooldown=0.3, clip=0.0),
    "bert": dict(betas=(0.9, 0.999), eps=1e-6, decoupled_wd=0.0, wd=0.01, mask=(0.15, 0.1, 0.1), warmup=0.01,
                 cooldown=0.99, clip=1.0),
}


def build(recipe: str, d_model: int, n_layer: int, seq_len: int, seed: int = 0):
    """A randomly initialised ModernBertForMaskedLM / BertForMaskedLM of this width and depth,
    heads of 64, each recipe's own MLP ratio, on KBERT's token ids."""
    import transformers

    torch.manual_seed(seed)
    ids = dict(vocab_size=VOCAB, pad_token_id=PAD_ID)
    if recipe == "modernbert":
        cfg = transformers.ModernBertConfig(
            hidden_size=d_model, intermediate_size=d_model * 3 // 2, num_hidden_layers=n_layer,
            num_attention_heads=max(1, d_model // 64), max_position_embeddings=seq_len, local_attention=128,
            layer_types=["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(n_layer)],
            cls_token_id=CLS_ID, sep_token_id=SEP_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID, mask_token_id=MASK_ID,
            sparse_prediction=True, attn_implementation="sdpa", **ids)
        return transformers.ModernBertForMaskedLM(cfg)
    if recipe == "bert":
        cfg = transformers.BertConfig(hidden_size=d_model, num_hidden_layers=n_layer, num_attention_heads=max(1, d_model // 64),
                                      intermediate_size=4 * d_model, max_position_embeddings=seq_len,
                                      attn_implementation="sdpa", **ids)
        return transformers.BertForMaskedLM(cfg)
    raise ValueError(f"unknown baseline recipe {recipe!r}; choose from {sorted(RECIPES)}")


def optimizer(model, recipe: str, lr: float) -> torch.optim.AdamW:
    """torch's AdamW with the recipe's settings. ModernBERT's decoupled decay shrinks weights
    by wd x (lr_t / lr) a step, torch's by lr_t x weight_decay: weight_decay = wd / lr gives
    the same (optimizer.decoupled_decay)."""
    from optimizer import decoupled_decay

    R = RECIPES[recipe]
    wd = decoupled_decay(R["decoupled_wd"], lr) if R["decoupled_wd"] else R["wd"]
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=R["betas"], eps=R["eps"], weight_decay=wd)


def lr_at(recipe: str, step: int, steps: int) -> float:
    """The recipe's schedule multiplier at `step` (warm-up, stable, linear decay)."""
    R = RECIPES[recipe]
    return trainer.lr_multiplier(step, trainer.TrainConfig(steps=steps, warmup_frac=R["warmup"], cooldown_frac=R["cooldown"]))


def document_masks(ids: torch.Tensor, local: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) rows -> bool attention mask (B, 1, T, T) of same-document pairs (and, with
    `local`, |i - j| <= local) and the positions within each document (B, T), restarting at
    every [CLS]."""
    docs = document_ids(ids)
    mask = docs[:, :, None] == docs[:, None, :]
    if local is not None:
        i = torch.arange(ids.size(1), device=ids.device)
        mask = mask & ((i[:, None] - i[None, :]).abs() <= local)
    starts = torch.cat([torch.ones_like(docs[:, :1], dtype=torch.bool), docs[:, 1:] != docs[:, :-1]], dim=1)
    idx = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return mask[:, None], idx - first


def hidden_states(model, recipe: str, ids: torch.Tensor, doc_masks: bool = True) -> torch.Tensor:
    """The encoder's last hidden states (B, T, d) of packed rows, documents kept apart
    (doc_masks=False: every row one sequence, which the fairness test shows is wrong)."""
    full, pos = document_masks(ids)
    if not doc_masks:
        full, pos = torch.ones_like(full), None
    if recipe == "modernbert":
        local = document_masks(ids, model.config.local_attention // 2)[0] if doc_masks else None
        mask = {"full_attention": full, "sliding_attention": full & local if local is not None else full}
        return model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.bert(input_ids=ids, attention_mask=full, position_ids=pos).last_hidden_state


def head_logits(model, recipe: str, h: torch.Tensor) -> torch.Tensor:
    """(N, d) hidden states at predicted positions -> (N, V) logits through the model's MLM head."""
    if recipe == "modernbert":
        return model.decoder(model.head(h))
    return model.cls(h)


def mlm_loss_sum(model, recipe: str, inputs: torch.Tensor, labels: torch.Tensor, doc_masks: bool = True):
    """(summed cross-entropy over the labelled positions, their number): the loss of the
    model's own MLM head, run on the labelled positions only."""
    h = hidden_states(model, recipe, inputs, doc_masks)
    sel = labels >= 0
    logits = head_logits(model, recipe, h[sel]).float()
    return torch.nn.functional.cross_entropy(logits, labels[sel], reduction="sum"), int(sel.sum())


@torch.no_grad()
def log_probs(model, recipe: str, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """evals.pll_scores' log_probs_fn: (N, V) log-probabilities at the [MASK] positions of
    ids (B, T), one sentence per row, [PAD] outside attention_mask."""
    full = (attention_mask[:, :, None] & attention_mask[:, None, :])[:, None]
    if recipe == "modernbert":
        local = document_masks(ids, model.config.local_attention // 2)[0]
        h = model.model(input_ids=ids, attention_mask={"full_attention": full, "sliding_attention": full & local}).last_hidden_state
    else:
        h = model.bert(input_ids=ids, attention_mask=full).last_hidden_state
    return head_logits(model, recipe, h[ids == MASK_ID]).float().log_softmax(-1)


def linear_weights(model) -> int:
    """Weights of the linear layers other than the vocabulary head: the 6 x N x tokens term."""
    V = model.config.vocab_size
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features != V)


def step_flops(model, recipe: str, batch: np.ndarray, n_predicted: int) -> float:
    """Training FLOPs of one step on packed rows, counted as trainer.training_flops counts
    KBERT's: 6 x linear weights x real tokens, 12 x d x the pairs each layer's mask lets
    through, 6 x d x V x the rows sent through the vocabulary head (the predicted ones)."""
    cfg = model.config
    lengths = trainer.document_lengths(batch)
    if recipe == "modernbert":
        windows = [10**9 if t == "full_attention" else cfg.local_attention // 2 + 1 for t in cfg.layer_types]
    else:
        windows = [10**9] * cfg.num_hidden_layers
    pairs = sum(trainer.attention_pairs(lengths, w) for w in windows)
    return (6 * linear_weights(model) * int(lengths.sum()) + 12 * cfg.hidden_size * pairs
            + 6 * cfg.hidden_size * cfg.vocab_size * n_predicted)


# ----------------------------------------------------------------------------------------
# Base-size models for the throughput benchmark (bench/throughput.py)


def base_model(name: str, device):
    """ModernBERT-base (sparse prediction, its fastest attention that loads) or BERT-base, randomly
    initialised; returns (model, attention implementation)."""
    import transformers

    if name == "modernbert":
        config = transformers.ModernBertConfig()  # the defaults are ModernBERT-base
        config.sparse_prediction = True  # the vocab head only on predicted tokens, as in its pretraining
        cls, impls = transformers.ModernBertForMaskedLM, ("flash_attention_2", "sdpa")
    else:
        config = transformers.BertConfig()  # bert-base-uncased shape
        cls, impls = transformers.BertForMaskedLM, ("sdpa",)
    for impl in impls:
        try:
            return cls._from_config(config, attn_implementation=impl).to(device), impl
        except Exception as e:  # flash-attn not installed, ...
            print(f"{name}: attention {impl} unavailable ({type(e).__name__}: {str(e)[:100]})")
    raise RuntimeError(f"no attention implementation of {name} loads")


def unpacked_flops(model, name: str, seq_len: int, tokens: int, n_pred: float) -> float:
    """FLOPs of a step over full rows of seq_len random ids (one sequence a row), counted as
    step_flops counts them; BERT's head on every position (as BertForMaskedLM runs it)."""
    cfg = model.config
    d, n_seqs = cfg.hidden_size, tokens // seq_len
    if name == "modernbert":
        types = getattr(cfg, "layer_types", None)
        n_global = (sum(t == "full_attention" for t in types) if types else
                    sum(1 for i in range(cfg.num_hidden_layers) if i % cfg.global_attn_every_n_layers == 0))
        w = cfg.local_attention // 2 + 1  # |i - j| <= local_attention / 2
        local_pairs = seq_len * (2 * w - 1) - w * (w - 1)
        pairs = n_seqs * (n_global * seq_len**2 + (cfg.num_hidden_layers - n_global) * local_pairs)
        head_rows = n_pred
    else:
        pairs = n_seqs * cfg.num_hidden_layers * seq_len**2
        head_rows = tokens
    return 6 * linear_weights(model) * tokens + 12 * d * pairs + 6 * d * cfg.vocab_size * head_rows
