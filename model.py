"""KBERT: a BERT-style encoder with a modern speedrun architecture, in one file.

Input is a batch of packed rows, `input_ids (B, T)`. Each [CLS] (id 50256) starts a
document and a run of [PAD] forms a document of its own, so a token attends only to
tokens of its own document and within a bidirectional sliding window |i - j| < W. Local
layers use a short window and every `global_every`-th layer a long one; both are passed
to `forward` as a tensor so a training schedule can grow them without recompiling.

On CUDA attention is FlexAttention with a BlockMask built from the document boundaries;
on CPU (where FlexAttention has no backward) it is SDPA with the same mask materialised
from the same `mask_mod`: local layers banded (query blocks against the key blocks their
window reaches, so the masked pairs beyond it cost nothing), global layers dense. Tests
check all three against each other.

Architecture (credits in comments where each piece is built):
  token embedding -> RMSNorm -> n_layer pre-norm blocks [attention with QK-norm and
  half-truncated rotary, ReLU^2 MLP] with learnable residual/x0 mixing, U-net skips
  and value residual -> RMSNorm -> heads (MLM tied to the embedding, classification,
  span).
This module has no side effects and knows nothing of files, processes or the Hub.
"""
import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

CLS_ID, MASK_ID, SEP_ID, PAD_ID = 50256, 50257, 50258, 50259  # see tokenizer.py
N_TARGETS = CLS_ID  # MLM targets are ordinary GPT-2 tokens, ids below [CLS]: the head scores only those
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
    """(B, 1, T, T) bool mask for SDPA: mask_mod evaluated on every pair, by broadcasting."""
    i = torch.arange(docs.size(1), device=docs.device)
    return ((docs[:, :, None] == docs[:, None, :]) & ((i[:, None] - i[None, :]).abs() < window))[:, None]


class BandedMask(NamedTuple):
    """The CPU path of a local layer: queries in blocks of `block` tokens attend only to the
    keys of the `reach` blocks on either side, the blocks a window can reach, instead of all
    T keys (on CPU, where FlexAttention has no backward, this is what skips the masked
    pairs). mask (B * nb, 1, block, (2 reach + 1) block) is mask_mod on those pairs."""
    mask: torch.Tensor
    block: int
    reach: int


BAND_BLOCK = 64  # query block of banded attention (tokens): a window of 128 then spans 5 blocks, not T / 64


def banded_mask(docs: torch.Tensor, window: torch.Tensor, max_window: int) -> BandedMask | None:
    """mask_mod on the (query block, neighbouring key blocks) pairs that a window of at most
    max_window tokens can reach; None where the band would not be at most half the row (then
    the layer uses dense_mask: on 2 CPU cores the band's gathers cost about what it saves
    there). Keys past either end of the row get document -1: never attended."""
    B, T = docs.shape
    block = BAND_BLOCK
    reach = -(-(max_window - 1) // block)
    span = (2 * reach + 1) * block
    if T % block or 2 * span > T:
        return None
    nb = T // block
    padded = F.pad(docs, (reach * block, reach * block), value=-1)
    k_docs = padded.unfold(1, span, block)  # (B, nb, span)
    q_docs = docs.view(B, nb, block)
    q_pos = torch.arange(T, device=docs.device).view(nb, block)
    k_pos = torch.arange(-reach * block, T + reach * block, device=docs.device).unfold(0, span, block)  # (nb, span)
    near = (q_pos[:, :, None] - k_pos[:, None, :]).abs() < window
    mask = (q_docs[..., :, None] == k_docs[..., None, :]) & near  # (B, nb, block, span)
    return BandedMask(mask.view(B * nb, 1, block, span), block, reach)


def banded_attention(q, k, v, bm: BandedMask, scale: float) -> torch.Tensor:
    """SDPA of (B, H, T, Dh) q, k, v under a BandedMask: each query block against its band of
    keys; exact against dense SDPA with dense_mask (tests/test_model.py)."""
    B, H, T, Dh = q.shape
    nb, pad = T // bm.block, bm.reach * bm.block
    span = (2 * bm.reach + 1) * bm.block

    def band(t):  # (B, H, T, Dh) -> (B * nb, H, span, Dh)
        t = F.pad(t, (0, 0, pad, pad)).unfold(2, span, bm.block)  # (B, H, nb, Dh, span)
        return t.permute(0, 2, 1, 4, 3).reshape(B * nb, H, span, Dh)

    qb = q.view(B, H, nb, bm.block, Dh).transpose(1, 2).reshape(B * nb, H, bm.block, Dh)
    y = F.scaled_dot_product_attention(qb, band(k), band(v), attn_mask=bm.mask, scale=scale)
    return y.view(B, nb, H, bm.block, Dh).transpose(1, 2).reshape(B, H, T, Dh)


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


class SoftcapCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of soft-capped logits z = cap * tanh(h W^T / cap), and the number of
    rows whose target has the top logit, with the gradients of h and W computed in the same
    pass: the logits are made CHUNK rows at a time in two reused buffers, so the (N, V) float32
    logits never exist and no element-wise pass over them is repeated by a backward; only
    d loss / d logits is kept, in the matmul dtype, for the two gradient matmuls. The backward
    just scales the stored gradients. (The idea of Liger-Kernel's fused linear cross-entropy
    and of Wijmans et al. 2024, "Cut Your Losses", in plain torch.) With t = tanh(x / cap):
    d loss / d x = (softmax(z) - onehot) * (1 - t^2).
    h (N, D), w (V, D), target (N,); matmuls in `dtype`, the element-wise math in float32
    (float64 for a float64 reference). cap 0: no cap."""

    CHUNK = 64  # rows: 64 x 50,256 float32 logits = 12.9 MB a buffer

    @staticmethod
    def forward(ctx, h, w, target, cap: float, dtype: torch.dtype):
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(dtype, torch.float32)
        N, V, c = h.size(0), w.size(0), SoftcapCrossEntropy.CHUNK
        # the rows padded with zeros to whole chunks: every matmul has one of a few shapes, whatever the number of
        # masked tokens. With a new shape every step, CPU memory grew by 8-13 MB a step (freed blocks of sizes never
        # asked for again; records/2026-12-05-cpu-frontier/heap). Padded rows add nothing to the loss or gradients.
        M = max(c, -(-N // c) * c)
        hd = F.pad(h.to(dtype), (0, 0, 0, M - N))
        target = F.pad(target, (0, M - N))
        wd = w.to(dtype)
        t, p = (torch.empty(c, V, dtype=acc, device=h.device) for _ in range(2))
        mm_out = t if dtype == acc else torch.empty(c, V, dtype=dtype, device=h.device)
        g = torch.empty(M, V, dtype=dtype, device=h.device) if grads else None  # d loss / d logits
        loss = torch.zeros((), dtype=acc, device=h.device)
        correct = torch.zeros((), dtype=torch.int64, device=h.device)
        for lo in range(0, M, c):
            n = min(c, N - lo)  # real rows in this chunk
            tc, pc, tgt = t, p, target[lo:lo + c, None]
            torch.mm(hd[lo:lo + c], wd.t(), out=mm_out)
            if mm_out is not t:
                tc.copy_(mm_out)
            if cap > 0:
                tc.mul_(1 / cap).tanh_().mul_(cap)  # z
            top = tc.amax(-1, keepdim=True)
            z_tgt = tc.gather(1, tgt)
            torch.sub(tc, top, out=pc).exp_()  # exp(z - max z)
            sum_exp = pc.sum(-1, keepdim=True)
            loss += (top - z_tgt + sum_exp.log())[:n].sum()
            correct += (z_tgt >= top)[:n].sum()
            if grads:
                if cap > 0:
                    tc.mul_(1 / cap).square_()  # tanh^2
                    pc.addcmul_(pc, tc, value=-1)  # exp(z - max) (1 - tanh^2)
                    onehot = 1 - tc.gather(1, tgt)
                else:
                    onehot = torch.ones_like(z_tgt)
                pc.mul_(1 / sum_exp).scatter_add_(1, tgt, -onehot)  # (softmax(z) - onehot) (1 - tanh^2)
                pc[n:].zero_()  # padded rows: no gradient
                g[lo:lo + c].copy_(pc)
        grad_h = (g @ wd)[:N].to(h.dtype) if grads else None
        grad_w = (g.t() @ hd).to(w.dtype) if grads else None
        ctx.save_for_backward(grad_h, grad_w)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


class Rotary(nn.Module):
    """Rotary position embedding on half of each head's dims; the other half carries no
    position (half-truncated RoPE, from modded-nanogpt). The tables are made once per
    forward and shared by every layer."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        n = head_dim // 4
        freqs = (1.0 / base) ** torch.linspace(0, 1, n)
        self.register_buffer("freqs", torch.cat([freqs, freqs.new_zeros(n)]), persistent=False)

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, 1, 1, head_dim): x * cos + swap_halves(x) * sin rotates x."""
        theta = torch.outer(torch.arange(T, device=self.freqs.device, dtype=torch.float32), self.freqs)
        cos, sin = theta.cos(), theta.sin()
        return torch.cat([cos, cos], -1)[:, None, None], torch.cat([sin, -sin], -1)[:, None, None]


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, T, ..., head_dim) rotated in float32 and returned in its dtype:
    (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin)."""
    cos, sin = rope
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([x2, x1], -1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.head_dim, self.scale = cfg.n_head, cfg.head_dim, cfg.attn_scale
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # value residual (Zhou et al. 2024, "Value Residual Learning"): v <- a*v + (1-a)*v_first
        self.value_mix = nn.Parameter(torch.tensor(0.5)) if cfg.value_residual and layer > 0 else None

    def forward(self, x, mask, v_first, rope):  # x: (B, T, D)
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        v = qkv[:, :, 2].contiguous()  # a strided view of qkv otherwise: compiled CPU FlexAttention gets it wrong (torch 2.13)
        if v_first is None:
            v_first = v
        elif self.value_mix is not None:
            v = self.value_mix * v + (1 - self.value_mix) * v_first
        q, k = apply_rotary(rms_norm(qkv[:, :, :2]).type_as(v), rope).unbind(2)  # QK-norm, then rotary, both at once
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask, scale=self.scale)
        else:  # CPU: float32 even under autocast, where the SDPA kernels are faster than in bf16 (2 cores, torch 2.13)
            with torch.autocast(x.device.type, enabled=False):
                q, k, v = (t.float() for t in (q, k, v))
                if isinstance(mask, BandedMask):
                    y = banded_attention(q, k, v, mask, self.scale)
                else:
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            y = y.to(v_first.dtype)
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

    def forward(self, x, x0, mask, v_first, rope):
        x = self.mix[0] * x + self.mix[1] * x0
        a, v_first = self.attn(rms_norm(x), mask, v_first, rope)
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
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        n_skip = cfg.n_layer // 2 if cfg.unet_skips else 0
        # U-net skips (modded-nanogpt, after Ronneberger et al. 2015): the second half of the
        # stack adds gated copies of the first half's outputs in mirror order.
        self.skip_weights = nn.Parameter(torch.ones(n_skip)) if n_skip else None
        self.mlm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # "flex": FlexAttention + BlockMask; "sdpa": SDPA, local layers banded (BandedMask) where that is shorter
        # than the row; "dense": SDPA with dense masks everywhere (the reference); auto: flex on CUDA, else sdpa
        self.attn_backend = "auto"
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
        if flex:  # built once, shared by the layers
            masks = (block_mask(docs, windows[0]), block_mask(docs, windows[1]))
        else:
            # banded local layers: the band covers the window (its value, read here; under torch.compile
            # the config's local_window, which the trainer makes the schedule's largest)
            widest = self.cfg.local_window if torch.compiler.is_compiling() else int(windows[0])
            masks = (banded_mask(docs, windows[0], widest) if self.attn_backend != "dense" else None,
                     dense_mask(docs, windows[1]))
            if masks[0] is None:
                masks = (dense_mask(docs, windows[0]), masks[1])
        rope = self.rotary(input_ids.size(1))
        x = x0 = rms_norm(self.embed(input_ids))
        if not self.cfg.residual_fp32 and torch.is_autocast_enabled(input_ids.device.type):
            x = x0 = x0.to(torch.get_autocast_dtype(input_ids.device.type))
        v_first, skips = None, []
        n_skip = 0 if self.skip_weights is None else self.skip_weights.numel()
        for i, block in enumerate(self.blocks):
            j = i - (self.cfg.n_layer - n_skip)  # index into the second half
            if j >= 0:
                x = x + self.skip_weights[j] * skips.pop()
            x, v_first = block(x, x0, masks[int(self.cfg.is_global(i))], v_first, rope)
            if i < n_skip:
                skips.append(x)
        return rms_norm(x)

    def head_weight(self) -> torch.Tensor:
        """(V, D): the MLM output matrix, the token embedding itself when tied."""
        return self.embed.weight if self.mlm_head is None else self.mlm_head.weight

    def capped_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, D) -> float32 logits (N, N_TARGETS) of the ordinary tokens, soft-capped."""
        logits = F.linear(h, self.head_weight()[:N_TARGETS].type_as(h)).float()
        if self.cfg.softcap > 0:
            logits = self.cfg.softcap * torch.tanh(logits / self.cfg.softcap)
        return logits

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, D) -> float32 logits (N, V), soft-capped. Ids that are never a target ([CLS],
        [MASK], [SEP], [PAD] and the rows that pad the vocabulary) get -inf: zero probability,
        as in the training loss, so a fill-mask never answers [MASK]."""
        return F.pad(self.capped_logits(h), (0, self.cfg.vocab_size - N_TARGETS), value=float("-inf"))

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
        """Cross-entropy only at positions with a label (labels >= 0): the head never sees
        the ~80% of positions that carry no prediction. Returns (loss, n_correct, n_labels)."""
        sel = labels >= 0
        target = labels[sel]
        loss, correct = self.mlm_head_loss(hidden[sel], target, reduction)
        return loss, correct, target.numel()

    def mlm_head_loss(self, h: torch.Tensor, target: torch.Tensor, reduction: str = "mean"):
        """h (N, D), target (N,) -> (loss, n_correct): the soft-capped cross-entropy over the
        ordinary tokens. On CPU fused and chunked (SoftcapCrossEntropy: matmuls in autocast's
        dtype, the rest in float32); on CUDA the plain formula, which the trainer compiles
        (inductor fuses the cap and the cross-entropy)."""
        if h.is_cuda:
            logits = self.capped_logits(h)
            return F.cross_entropy(logits, target, reduction=reduction), (logits.argmax(-1) == target).sum()
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            loss, correct = SoftcapCrossEntropy.apply(h, self.head_weight()[:N_TARGETS], target, self.cfg.softcap, dtype)
        return (loss / max(1, target.numel()) if reduction == "mean" else loss), correct

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
