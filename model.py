"""KBERT: a BERT-style encoder with a modern speedrun architecture, in one file.

Input is a batch of packed rows, `input_ids (B, T)`. Each [CLS] (id 50256) starts a
document and a run of [PAD] forms a document of its own, so a token attends only to
tokens of its own document and within a bidirectional sliding window |i - j| < W. Local
layers use a short window and every `global_every`-th layer a long one; both are passed
to `forward` as a tensor so a training schedule can grow them without recompiling.

On CUDA attention is FlexAttention with a BlockMask built from the document boundaries;
on CPU (where FlexAttention has no backward) it is SDPA with the same mask materialised
from the same `mask_mod`. A test checks that both give the same outputs.

Architecture (credits in comments where each piece is built):
  token embedding -> RMSNorm -> n_layer pre-norm blocks [attention with QK-norm and
  half-truncated rotary, ReLU^2 MLP] with learnable residual/x0 mixing, U-net skips
  and value residual -> RMSNorm -> heads (MLM tied to the embedding, classification,
  span).
This module has no side effects and knows nothing of files, processes or the Hub.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

CLS_ID, MASK_ID, SEP_ID, PAD_ID = 50256, 50257, 50258, 50259  # see tokenizer.py
BLOCK = 128  # FlexAttention block size (tokens)

# ----------------------------------------------------------------------------------------
# Config and presets

PRESETS = {
    # name: (n_layer, d_model, n_head, d_mlp)
    "tiny": (4, 64, 2, 256),  # CPU tests and the demo; ~3.4M params, mostly embedding
    "small": (12, 512, 4, 1536),
    "base": (20, 768, 6, 2048),  # ~149M params like ModernBERT-base (layout of lapp0/kbert)
    "large": (28, 1024, 8, 2816),
}


@dataclass
class ModelConfig:
    # fills n_layer, d_model, n_head, d_mlp when those are 0
    preset: str = field(default="base", metadata={"allowed": "tiny, small, base or large"})
    n_layer: int = field(default=0, metadata={"allowed": ">= 0"})  # transformer blocks
    d_model: int = field(default=0, metadata={"allowed": ">= 0"})  # width of the residual stream
    # attention heads (d_model / n_head must be divisible by 4)
    n_head: int = field(default=0, metadata={"allowed": ">= 0"})
    d_mlp: int = field(default=0, metadata={"allowed": ">= 0"})  # hidden width of the ReLU^2 MLP
    # GPT-2's 50,257 + [MASK] [SEP] [PAD], padded to 128
    vocab_size: int = field(default=50304, metadata={"allowed": ">= 50260"})
    # default sliding window (tokens) of local layers
    local_window: int = field(default=128, metadata={"allowed": ">= 1"})
    global_window: int = field(default=8192, metadata={"allowed": ">= 1"})  # default window of global layers
    # every 3rd layer (and the last) is global, as in ModernBERT
    global_every: int = field(default=3, metadata={"allowed": ">= 1"})
    # modded-nanogpt's base; half the head dims are not rotated
    rope_base: float = field(default=1024.0, metadata={"allowed": "> 0"})
    # QK-normed logits are scaled by this (modded-nanogpt), not 1/sqrt(d)
    attn_scale: float = field(default=0.12, metadata={"allowed": "> 0"})
    # tanh cap on MLM logits (Gemma 2 / modded-nanogpt); 0 disables
    softcap: float = field(default=15.0, metadata={"allowed": ">= 0"})
    tie_embeddings: bool = True  # MLM head reuses the token embedding matrix
    unet_skips: bool = True  # layer i of the second half adds a gated copy of layer n-1-i's input
    value_residual: bool = True  # mix every layer's values with the first layer's (ResFormer)
    # on attention/MLP outputs; 0 for pretraining, ~0.1 for finetuning
    dropout: float = field(default=0.0, metadata={"allowed": "in [0, 1)"})
    # Under bf16 autocast the residual stream (embedding output, block sums, U-net skips) stays
    # fp32 by default. False carries it in bf16 as modded-nanogpt does: the norms, mixes and
    # residual adds, memory-bound kernels, then move half the bytes. No effect without autocast.
    residual_fp32: bool = True
    head_dim: int = field(init=False, default=0)  # derived: d_model // n_head

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name, value in zip(("n_layer", "d_model", "n_head", "d_mlp"), PRESETS[self.preset]):
            if getattr(self, name) == 0:
                setattr(self, name, value)
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 4:
            raise ValueError(f"d_model={self.d_model} must split into n_head={self.n_head} heads of a size divisible by 4")
        self.head_dim = self.d_model // self.n_head

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0 or layer == self.n_layer - 1

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


# ----------------------------------------------------------------------------------------
# Attention masks: one mask_mod, two backends


def document_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) int32 document index per token: each [CLS] opens a document and so
    does the first [PAD] of a run, so padding never shares a document with real tokens."""
    is_pad = input_ids == PAD_ID
    prev_pad = F.pad(is_pad[:, :-1], (1, 0), value=False)
    starts = (input_ids == CLS_ID) | (is_pad & ~prev_pad)
    return starts.cumsum(dim=1, dtype=torch.int32)


def make_mask_mod(docs: torch.Tensor, window: torch.Tensor):
    """Same document and |q - kv| < window. docs: (B, T); window: 0-dim int tensor."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & ((q_idx - kv_idx).abs() < window)

    return mask_mod


def dense_mask(docs: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool mask for SDPA, materialised from the same mask_mod."""
    B, T = docs.shape
    return create_mask(make_mask_mod(docs, window), B, None, T, T, device=docs.device)


def block_mask(docs: torch.Tensor, window: torch.Tensor) -> BlockMask:
    """BlockMask built directly from document ranges per 128-token block, far cheaper than
    evaluating the mask_mod everywhere (create_block_mask). Documents are contiguous and
    their ids non-decreasing along a row, so a block holds the id range [lo, hi]:
      - a (q, kv) block pair can hold a visible pair when the id ranges overlap and the
        closest positions are within the window;
      - it is full (no per-element mask needed) when both blocks are one and the same
        document and even the farthest positions are within the window."""
    B, T = docs.shape
    assert T % BLOCK == 0, f"sequence length {T} must be a multiple of {BLOCK} for FlexAttention"
    nb = T // BLOCK
    blocks = docs.view(B, nb, BLOCK)
    lo, hi = blocks[..., 0], blocks[..., -1]  # (B, nb)
    i = torch.arange(nb, device=docs.device)
    dist = (i[:, None] - i[None, :]).abs()  # (nb, nb) block distance
    near = (dist - 1).clamp(min=0) * BLOCK + (dist > 0).int() < window  # closest pair in window
    far = (dist + 1) * BLOCK - 1 < window  # farthest pair in window
    overlap = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # (B, nq, nkv)
    single = lo == hi
    same_doc = single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    any_ = overlap & near
    full = same_doc & far
    partial = any_ & ~full

    pn, pi = block_lists(partial)
    fn, fi = block_lists(full)
    # The mask is symmetric in q and kv, so the q-major lists that the backward pass reads are
    # the kv-major ones: passing them skips BlockMask.from_kv_blocks' transpose (an argsort).
    return BlockMask(seq_lengths=(T, T), kv_num_blocks=pn, kv_indices=pi, full_kv_num_blocks=fn, full_kv_indices=fi,
                     q_num_blocks=pn, q_indices=pi, full_q_num_blocks=fn, full_q_indices=fi,
                     BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=make_mask_mod(docs, window))


def block_lists(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nq, nkv) bool -> counts (B, 1, nq) and indices (B, 1, nq, nkv): each row's True
    columns first, ascending, then the others (a stable descending argsort of m). Built from
    cumulative sums and one scatter, without a sort: inductor's sort lowering is fragile
    (torch 2.13 stopped compiling the argsort in its own block-mask code)."""
    m32 = m.to(torch.int32)
    counts = m32.sum(-1, dtype=torch.int32)
    slot = torch.where(m, m32.cumsum(-1) - 1, counts[..., None] + (1 - m32).cumsum(-1) - 1)  # int64
    cols = torch.arange(m.size(-1), device=m.device, dtype=torch.int32).expand_as(m32)
    idx = torch.empty_like(m32).scatter_(-1, slot, cols)
    return counts[:, None], idx[:, None]


# ----------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embedding on half of each head's dims; the other half carries no
    position (half-truncated RoPE, from modded-nanogpt)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        n = head_dim // 4
        freqs = (1.0 / base) ** torch.linspace(0, 1, n)
        self.register_buffer("freqs", torch.cat([freqs, freqs.new_zeros(n)]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, D)
        T = x.size(1)
        theta = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.freqs)
        cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        y = torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)
        return y.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.head_dim, self.scale = cfg.n_head, cfg.head_dim, cfg.attn_scale
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        # value residual (Zhou et al. 2024, "Value Residual Learning"): v <- a*v + (1-a)*v_first
        self.value_mix = nn.Parameter(torch.tensor(0.5)) if cfg.value_residual and layer > 0 else None

    def forward(self, x, mask, v_first):  # x: (B, T, D)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        v = v.contiguous()  # a strided view of qkv here: compiled CPU FlexAttention gets it wrong (torch 2.13)
        if v_first is None:
            v_first = v
        elif self.value_mix is not None:
            v = self.value_mix * v + (1 - self.value_mix) * v_first
        q, k = self.rotary(rms_norm(q).type_as(v)), self.rotary(rms_norm(k).type_as(v))  # QK-norm
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.proj(y), v_first


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())  # ReLU^2 (So et al. 2021, Primer)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn, self.mlp = Attention(cfg, layer), MLP(cfg)
        # x <- a*x + b*x0: learnable mix of the residual stream and the embedding (modded-nanogpt)
        self.mix = nn.Parameter(torch.tensor([1.0, 0.0]))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, x0, mask, v_first):
        x = self.mix[0] * x + self.mix[1] * x0
        a, v_first = self.attn(rms_norm(x), mask, v_first)
        x = x + self.dropout(a)
        x = x + self.dropout(self.mlp(rms_norm(x)))
        return x, v_first


# ----------------------------------------------------------------------------------------
# The encoder


class KBERT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        n_skip = cfg.n_layer // 2 if cfg.unet_skips else 0
        # U-net skips (modded-nanogpt, after Ronneberger et al. 2015): the second half of the
        # stack adds gated copies of the first half's outputs in mirror order.
        self.skip_weights = nn.Parameter(torch.ones(n_skip)) if n_skip else None
        self.mlm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.attn_backend = "auto"  # "flex" (FlexAttention + BlockMask), "sdpa" (dense mask), auto: flex on CUDA
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """All initialisation in one place.
        - embedding: N(0, 1/sqrt(d)) so that tied MLM logits start at unit scale;
        - hidden matrices: uniform with std 0.5/sqrt(fan_in) (modded-nanogpt);
        - attention and MLP output projections: zero, so every block starts as identity;
        - untied MLM head: zero; gates: residual 1, x0 0, value mix 0.5, skips 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        d = self.cfg.d_model

        def uniform_(w):
            bound = math.sqrt(3) * 0.5 / math.sqrt(w.size(1))
            w.copy_(torch.rand(w.shape, generator=gen) * 2 * bound - bound)

        self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=gen) / math.sqrt(d))
        for block in self.blocks:
            uniform_(block.attn.qkv.weight)
            uniform_(block.mlp.fc.weight)
            block.attn.proj.weight.zero_()
            block.mlp.proj.weight.zero_()
            block.mix.copy_(torch.tensor([1.0, 0.0]))
            if block.attn.value_mix is not None:
                block.attn.value_mix.fill_(0.5)
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        if self.mlm_head is not None:
            self.mlm_head.weight.zero_()

    def default_windows(self, device=None) -> torch.Tensor:
        return torch.tensor([self.cfg.local_window, self.cfg.global_window], dtype=torch.int32, device=device)

    def forward(self, input_ids: torch.Tensor, windows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, D). windows: int tensor [local, global]."""
        if windows is None:
            windows = self.default_windows(input_ids.device)
        docs = document_ids(input_ids)
        flex = self.attn_backend == "flex" or (self.attn_backend == "auto" and input_ids.is_cuda)
        build = block_mask if flex else dense_mask
        masks = (build(docs, windows[0]), build(docs, windows[1]))  # built once, shared by layers

        x = x0 = rms_norm(self.embed(input_ids))
        if not self.cfg.residual_fp32 and torch.is_autocast_enabled(input_ids.device.type):
            x = x0 = x0.to(torch.get_autocast_dtype(input_ids.device.type))
        v_first, skips = None, []
        n_skip = 0 if self.skip_weights is None else self.skip_weights.numel()
        for i, block in enumerate(self.blocks):
            j = i - (self.cfg.n_layer - n_skip)  # index into the second half
            if j >= 0:
                x = x + self.skip_weights[j] * skips.pop()
            x, v_first = block(x, x0, masks[int(self.cfg.is_global(i))], v_first)
            if i < n_skip:
                skips.append(x)
        return rms_norm(x)

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, D) -> float32 logits (N, V), soft-capped."""
        w = self.embed.weight if self.mlm_head is None else self.mlm_head.weight
        logits = F.linear(h, w.type_as(h)).float()
        if self.cfg.softcap > 0:
            logits = self.cfg.softcap * torch.tanh(logits / self.cfg.softcap)
        return logits

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
        """Cross-entropy only at positions with a label (labels >= 0): the head never sees
        the ~80% of positions that carry no prediction. Returns (loss, n_correct, n_labels)."""
        sel = labels >= 0
        target = labels[sel]
        loss, correct = self.mlm_head_loss(hidden[sel], target, reduction)
        return loss, correct, target.numel()

    def mlm_head_loss(self, h: torch.Tensor, target: torch.Tensor, reduction: str = "mean"):
        """h (N, D), target (N,) -> (loss, n_correct). Separate from mlm_loss so the trainer
        can compile it with a dynamic N (the number of predicted tokens varies per batch)."""
        logits = self.mlm_logits(h)
        loss = F.cross_entropy(logits, target, reduction=reduction)
        return loss, (logits.argmax(-1) == target).sum()

    def param_counts(self) -> dict:
        total = sum(p.numel() for p in self.parameters())
        emb = self.embed.weight.numel() + (self.mlm_head.weight.numel() if self.mlm_head is not None else 0)
        return {"total": total, "embedding": emb, "non_embedding": total - emb}


# ----------------------------------------------------------------------------------------
# Task heads (the finetuner puts one on top of KBERT)


class ClassificationHead(nn.Module):
    """Reads the hidden state at each example's [CLS]: norm -> dense -> GELU -> out.
    n_labels == 1 means regression (STS-B) with a mean-squared-error loss."""

    def __init__(self, d_model: int, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.n_labels = n_labels
        self.dense = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, n_labels)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, n_labels)
        x = F.gelu(self.dense(self.dropout(cls_hidden)))
        return self.out(self.dropout(x)).float()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.n_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.float())
        return F.cross_entropy(logits, labels)


class SpanHead(nn.Module):
    """Start and end logits per token for extractive QA (SQuAD)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.out = nn.Linear(d_model, 2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor):  # (B, T, D) -> start, end: (B, T)
        start, end = self.out(hidden).float().unbind(-1)
        return start, end

    @staticmethod
    def loss(start, end, start_pos, end_pos, valid: torch.Tensor) -> torch.Tensor:
        """Mean of start and end cross-entropy; positions where valid is False (padding,
        the question) get -inf logits. start_pos/end_pos: (B,) token indices (0 = [CLS])."""
        start = start.masked_fill(~valid, float("-inf"))
        end = end.masked_fill(~valid, float("-inf"))
        return 0.5 * (F.cross_entropy(start, start_pos) + F.cross_entropy(end, end_pos))
