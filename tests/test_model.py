"""model.py against references: FlexAttention vs dense SDPA, float64 gradients,
document/window isolation, heads, parameter counts."""
import pytest
import torch

from torch.nn.attention.flex_attention import BlockMask

from model import (CLS_ID, MASK_ID, N_TARGETS, PAD_ID, PRESETS, KBERT, ModelConfig, SoftcapCrossEntropy, SpanHead,
                   ClassificationHead, banded_attention, banded_mask, block_lists, block_mask, dense_mask, document_ids,
                   make_mask_mod)


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    m = KBERT(ModelConfig(preset="tiny", **overrides))
    with torch.no_grad():  # zero-init output projections would hide attention bugs
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(std=0.05)
    return m


def packed_batch(B=2, T=512, seed=0):
    """Rows of several documents of uneven lengths, one row ending in padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (B, T), generator=g)
    ids[:, 0] = CLS_ID
    ids[0, [p for p in (70, 130, 333) if p < T]] = CLS_ID
    if B > 1:
        ids[1, 200] = CLS_ID
        ids[1, T - 62 :] = PAD_ID
    return ids


def test_document_ids_padding_is_its_own_document():
    ids = torch.tensor([[CLS_ID, 5, 6, CLS_ID, 7, PAD_ID, PAD_ID]])
    assert document_ids(ids).tolist() == [[1, 1, 1, 2, 2, 3, 3]]


def test_block_mask_equals_torch_construction():
    """The sort-free block lists equal a stable descending argsort, and the BlockMask with the
    q-major lists taken from the kv-major ones equals BlockMask.from_kv_blocks' transpose."""
    g = torch.Generator().manual_seed(0)
    m = torch.rand(3, 9, 9, generator=g) < 0.4
    counts, idx = block_lists(m)
    assert torch.equal(counts[:, 0], m.sum(-1).int())
    assert torch.equal(idx[:, 0].long(), torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True))
    kinds = torch.zeros(2, dtype=torch.int64)  # partial and full blocks seen
    for T, window in ((512, 64), (1024, 128), (1024, 300), (2048, 2048)):
        ids = packed_batch(B=3, T=T, seed=T + window)
        docs = document_ids(ids)
        ours = block_mask(docs, torch.tensor(window))
        ref = BlockMask.from_kv_blocks(ours.kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks, ours.full_kv_indices,
                                       BLOCK_SIZE=128, mask_mod=ours.mask_mod)
        kinds += torch.stack([ours.kv_num_blocks.sum(), ours.full_kv_num_blocks.sum()])
        for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(ours, name), getattr(ref, name)), (T, window, name)
    assert (kinds > 0).all()


def random_documents(B, T, seed):
    """Rows of documents from 1 token to several blocks long, ending in [PAD] runs of 0 to 300
    tokens (1, and exactly one block, among them); the last row is a single document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (B, T), generator=g)
    for b in range(B - 1):
        pos = 0
        while pos < T:
            ids[b, pos] = CLS_ID
            longest = (1, 16, 128, 600)[torch.randint(4, (1,), generator=g).item()]
            pos += torch.randint(1, longest + 1, (1,), generator=g).item()
        pad = (0, 1, 50, 128, 300)[b % 5]
        ids[b, T - pad:] = PAD_ID
    ids[:, 0] = CLS_ID
    return ids


def block_matrix(num_blocks, indices):
    """(B, 1, n) counts and (B, 1, n, n) index lists -> (B, 1, n, n) how often each block is
    listed among each row's first `count` entries (the order, and what follows, is free)."""
    listed = torch.arange(indices.size(-1)) < num_blocks[..., None]
    return torch.zeros(indices.shape, dtype=torch.int32).scatter_add_(-1, indices.long(), listed.int())


def test_block_mask_matches_create_block_mask():
    """model.block_mask (from document ranges per block) against torch's create_block_mask,
    which evaluates the same mask_mod at every (q, kv) position: the same partial and full
    blocks, kv-major and q-major, for windows from 1 token to past the row."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = 6, 1024
    ids = random_documents(B, T, seed=0)
    docs = document_ids(ids)
    assert (docs[:, -1] > 1).sum() == B - 1 and (docs[-1] == 1).all()
    kinds = {}
    for w in (1, 5, 127, 128, 129, 200, 257, 640, T - 1, T, 4 * T):
        window = torch.tensor(w)
        ours = block_mask(docs, window)
        ref = create_block_mask(make_mask_mod(docs, window), B, None, T, T, device="cpu", BLOCK_SIZE=128)
        for side in ("kv", "q"):
            for full in ("", "full_"):
                n = f"{full}{side}_num_blocks"
                assert torch.equal(getattr(ours, n), getattr(ref, n)), (w, n)
                i = f"{full}{side}_indices"
                assert torch.equal(block_matrix(getattr(ours, n), getattr(ours, i)),
                                   block_matrix(getattr(ref, n), getattr(ref, i))), (w, i)
        kinds[w] = (ours.kv_num_blocks.sum().item(), ours.full_kv_num_blocks.sum().item())
    print("block_mask = create_block_mask; (partial, full) blocks by window:", kinds)
    assert kinds[1] == (B * T // 128, 0) and kinds[4 * T][1] > 0  # only the diagonal at 1; full blocks exercised


def test_gradients_match_float64_reference():
    m = random_model(local_window=64)
    ids = packed_batch(T=256)
    labels = torch.full_like(ids, -100)
    labels[:, 5::7] = ids[:, 5::7]
    labels[labels >= CLS_ID] = -100  # special ids are never targets
    loss, _, _ = m.mlm_loss(m(ids), labels)
    loss.backward()
    ref = random_model(local_window=64).double()
    loss64, _, _ = ref.mlm_loss(ref(ids), labels)
    loss64.backward()
    worst = 0.0
    for (name, p), p64 in zip(m.named_parameters(), ref.parameters()):
        rel = ((p.grad.double() - p64.grad).norm() / p64.grad.norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
    print(f"CPU path grad vs float64: worst relative error {worst:.2e}")
    assert abs(loss.item() - loss64.item()) < 1e-4
    assert worst < 1e-3


@torch.no_grad()
def test_bf16_residual_stream_only_under_autocast():
    """residual_fp32=False carries the block inputs/outputs in bf16 under autocast, stays close
    to the fp32 residual stream, and changes nothing without autocast."""
    ids = packed_batch(T=256)
    dtypes = []
    out = {}
    for fp32 in (True, False):
        m = random_model(local_window=64, residual_fp32=fp32)
        m.attn_backend = "sdpa"
        hooks = [b.register_forward_hook(lambda mod, inp, o: dtypes.append((fp32, o[0].dtype))) for b in m.blocks]
        out[fp32, "none"] = m(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[fp32, "bf16"] = m(ids).float()
        for h in hooks:
            h.remove()
    n = len(dtypes) // 4  # blocks per forward
    assert {d for _, d in dtypes[n:2 * n]} == {torch.float32}  # fp32 residual under autocast
    assert {d for _, d in dtypes[3 * n:]} == {torch.bfloat16}  # bf16 residual under autocast
    assert torch.equal(out[True, "none"], out[False, "none"])
    err = (out[False, "bf16"] - out[True, "bf16"]).abs().max().item()
    base = (out[True, "bf16"] - out[True, "none"]).abs().max().item()
    print(f"bf16 vs fp32 residual under autocast: max abs diff {err:.3f} (autocast vs fp32: {base:.3f}; outputs have RMS 1)")
    assert err < 0.1


@torch.no_grad()
def test_masks_never_cross_documents_or_windows():
    m = random_model(n_layer=1, local_window=16, global_window=16)  # 1 layer: receptive field = window
    ids = packed_batch(B=1, T=256)
    base = m(ids)
    pert = ids.clone()
    pert[0, 140:150] = (pert[0, 140:150] + 1) % 50000  # inside document 3 (130..332)
    out = m(pert)
    changed = (out - base).abs().amax(-1)[0] > 0
    pos = torch.nonzero(changed).flatten()
    assert changed[140:150].all()
    assert pos.min() >= 140 - 15 and pos.max() <= 149 + 15  # window |i - j| < 16
    assert pos.min() >= 130  # never leaks into the previous document (which ends at 129)
    # a deep model: other documents and other rows stay bit-identical
    ids2 = packed_batch(B=2, T=512)
    deep = random_model()
    h = deep(ids2)
    ids3 = ids2.clone()
    ids3[0, 71:130] = torch.randint(0, 50000, (59,))  # the body of document 2 of row 0
    h3 = deep(ids3)
    assert torch.equal(h[0, :70], h3[0, :70]) and torch.equal(h[0, 130:], h3[0, 130:])
    assert torch.equal(h[1], h3[1])


def test_dense_mask_evaluates_the_mask_mod_everywhere():
    from torch.nn.attention.flex_attention import create_mask

    docs = document_ids(random_documents(3, 256, seed=3))
    for w in (1, 7, 64, 300):
        ref = create_mask(make_mask_mod(docs, torch.tensor(w)), 3, None, 256, 256, device="cpu")
        assert torch.equal(dense_mask(docs, torch.tensor(w)), ref), w


def test_banded_attention_equals_dense_forward_and_backward():
    """Banded SDPA (query blocks against the key blocks the window reaches) against dense SDPA
    under the same mask_mod, outputs and q/k/v gradients, over random documents, [PAD] runs and
    windows from 1 token to past a block, with a band wider than the window too (the compiled
    path sizes the band by the schedule's widest window)."""
    import torch.nn.functional as F

    B, H, T, Dh = 3, 2, 1024, 16
    docs = document_ids(random_documents(B, T, seed=1))
    g = torch.Generator().manual_seed(0)
    worst, shapes = 0.0, set()
    for w, widest in ((1, 1), (5, 5), (64, 64), (65, 65), (100, 128), (128, 128)):
        bm = banded_mask(docs, torch.tensor(w), widest)
        assert bm is not None and (2 * bm.reach + 1) * bm.block < T and bm.reach * bm.block >= widest - 1
        shapes.add(bm.reach)
        q, k, v = (torch.randn(B, H, T, Dh, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = banded_attention(q, k, v, bm, scale=0.12)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, Dh, dtype=torch.float64)).sum(), (q, k, v))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(docs, torch.tensor(w)), scale=0.12)
        ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, Dh, dtype=torch.float64)).sum(), (q, k, v))
        worst = max(worst, (out - ref).abs().max().item(), *((a - b).abs().max().item() for a, b in zip(grads, ref_grads)))
    print(f"banded vs dense SDPA (float64), outputs and gradients: max abs diff {worst:.2e}; reaches {sorted(shapes)}")
    assert worst < 1e-12 and len(shapes) == 3
    assert banded_mask(docs, torch.tensor(300), 300) is None  # a band over half the row: dense instead


@torch.no_grad()
def test_model_paths_agree_banded_dense_and_flex():
    """The whole encoder with banded local layers (CPU default), dense SDPA and eager
    FlexAttention gives the same hidden states."""
    m = random_model(local_window=100, global_window=300)
    ids = random_documents(2, 1024, seed=5)
    assert banded_mask(document_ids(ids), torch.tensor(100), 100) is not None  # rows long enough for the band
    out = {}
    for backend in ("sdpa", "dense", "flex"):
        m.attn_backend = backend
        out[backend] = m(ids)
    err = max((out["sdpa"] - out["dense"]).abs().max().item(), (out["flex"] - out["dense"]).abs().max().item())
    print(f"encoder: banded / flex vs dense max abs diff {err:.2e}")
    assert err < 1e-5


def test_softcap_cross_entropy_against_autograd():
    """The fused, chunked head loss and its gradients against autograd through the plain
    formula, in float64: loss, gradients of h and W, the correct count, with and without the
    cap, for row counts around the chunk size (and none)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    for cap in (15.0, 0.0):
        for N in (0, 1, SoftcapCrossEntropy.CHUNK, SoftcapCrossEntropy.CHUNK + 3, 3 * SoftcapCrossEntropy.CHUNK - 1):
            h = torch.randn(N, 16, generator=g, dtype=torch.float64, requires_grad=True)
            w = (3 * torch.randn(300, 16, generator=g, dtype=torch.float64)).requires_grad_()
            t = torch.randint(0, 300, (N,), generator=g)
            loss, correct = SoftcapCrossEntropy.apply(h, w, t, cap, torch.float64)
            (0.7 * loss).backward()
            z = h @ w.t()
            z = cap * torch.tanh(z / cap) if cap else z
            ref = F.cross_entropy(z, t, reduction="sum")
            gh, gw = torch.autograd.grad(0.7 * ref, (h, w)) if N else (torch.zeros_like(h), torch.zeros_like(w))
            assert abs(loss.item() - ref.item()) < 1e-9 and correct.item() == (z.argmax(-1) == t).sum().item()
            assert torch.allclose(h.grad, gh, atol=1e-12) and torch.allclose(w.grad, gw, atol=1e-12), (cap, N)
    # in the model: the bf16 matmuls of autocast, against the same formula in float32
    m = random_model()
    hid = torch.randn(50, 64, generator=g)
    target = torch.randint(0, N_TARGETS, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.mlm_head_loss(hid, target)
    ref = F.cross_entropy(m.mlm_logits(hid), target)
    print(f"bf16 head loss {loss.item():.4f} vs float32 {ref.item():.4f}")
    assert abs(loss.item() - ref.item()) < 0.02


def test_mlm_logits_never_score_special_or_padding_ids():
    m = random_model()
    logits = m.mlm_logits(torch.randn(5, 64))
    assert logits.shape == (5, m.cfg.vocab_size)
    assert torch.isneginf(logits[:, N_TARGETS:]).all() and logits[:, :N_TARGETS].isfinite().all()
    assert N_TARGETS == CLS_ID < MASK_ID < PAD_ID


def test_mlm_loss_only_at_labelled_positions():
    m = random_model()
    ids = packed_batch(T=256)
    h = m(ids)
    labels = torch.full_like(ids, -100)
    labels[0, 3] = 17
    loss, correct, n = m.mlm_loss(h, labels)
    ref = torch.nn.functional.cross_entropy(m.mlm_logits(h[0, 3:4]), torch.tensor([17]))
    assert n == 1 and torch.allclose(loss, ref)
    assert m.mlm_logits(h[0])[:, :N_TARGETS].abs().max() <= m.cfg.softcap


def test_heads_against_hand_computation():
    """Heads with non-zero weights at d_model=2 against logits and losses worked out by hand;
    gelu is the exact (erf) one: gelu(1) = 0.8413447, gelu(-2) = -0.0455003, gelu(0.5) = 0.3457312."""
    h = torch.tensor([[1.0, 2.0], [0.5, -1.0]])  # two [CLS] states
    assert ClassificationHead(2, 3)(h).abs().sum() == 0  # zero-initialised output layer

    def head(n_labels, out_weight, out_bias):
        m = ClassificationHead(2, n_labels).eval()  # eval: no dropout
        with torch.no_grad():
            m.dense.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
            m.dense.bias.copy_(torch.tensor([0.0, -1.0]))
            m.out.weight.copy_(torch.tensor(out_weight))
            m.out.bias.copy_(torch.tensor(out_bias))
        return m

    # dense: [1, 2] -> [1, -2] and [0.5, -1] -> [0.5, 0.5]; gelu: [0.8413447, -0.0455003], [0.3457312, 0.3457312]
    cls = head(3, [[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]], [0.0, 0.5, -0.5])
    logits = cls(h)
    torch.testing.assert_close(logits, torch.tensor([[0.8413447, 0.4544997, 1.2281898], [0.3457312, 0.8457312, -0.1542688]]))
    # labels [2, 1]: mean over rows of log(sum(exp(row))) - row[label] = (0.7610413 + 0.6802697) / 2
    assert cls.loss(logits, torch.tensor([2, 1])).item() == pytest.approx(0.7206555, abs=1e-6)
    reg = head(1, [[1.0, -2.0]], [0.25])
    pred = reg(h)  # 0.8413447 + 2 * 0.0455003 + 0.25 and 0.3457312 - 2 * 0.3457312 + 0.25
    torch.testing.assert_close(pred, torch.tensor([[1.1823453], [-0.0957312]]))
    # targets [1, 0]: (0.1823453^2 + 0.0957312^2) / 2
    assert reg.loss(pred, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0212071, abs=1e-6)

    span = SpanHead(2)
    with torch.no_grad():
        span.out.weight.copy_(torch.eye(2))  # start = h[0], end = h[1] + 0.5
        span.out.bias.copy_(torch.tensor([0.0, 0.5]))
    hidden = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, -1.0], [3.0, 3.0]],
                           [[1.0, 1.0], [0.0, 0.0], [-1.0, 2.0], [0.0, 1.0]]])  # (B=2, T=4, D=2)
    start, end = span(hidden)
    torch.testing.assert_close(start, torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, -1.0, 0.0]]))
    torch.testing.assert_close(end, torch.tensor([[1.5, 0.5, -0.5, 3.5], [1.5, 0.5, 2.5, 1.5]]))
    valid = torch.tensor([[True, True, True, False], [True, False, True, True]])
    # invalid positions leave the softmax. start at [2, 0]: log(e^0 + e^1 + e^2) - 2 = 0.4076060 and
    # log(e^1 + e^-1 + e^0) - 1 = 0.4076060; end at [1, 2]: log(e^1.5 + e^0.5 + e^-0.5) - 0.5 = 1.4076060
    # and log(e^1.5 + e^2.5 + e^1.5) - 2.5 = 0.5514447; loss = (mean start + mean end) / 2
    loss = SpanHead.loss(start, end, torch.tensor([2, 0]), torch.tensor([1, 2]), valid)
    assert loss.item() == pytest.approx(0.6935657, abs=1e-6)


def test_preset_parameter_counts():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = KBERT(ModelConfig(preset=name)).param_counts()
        print(name, counts[name])
    assert counts["tiny"]["total"] < 5e6
    assert 145e6 < counts["base"]["total"] < 155e6  # ModernBERT-base: 149M
    assert counts["small"]["total"] < counts["base"]["total"] < counts["large"]["total"]


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig(preset="huge")
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(preset="tiny", n_head=3)


def test_init_is_deterministic_and_output_projections_zero():
    a, b = KBERT(ModelConfig(preset="tiny")), KBERT(ModelConfig(preset="tiny"))
    a.init_weights(seed=1)
    b.init_weights(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.blocks[0].attn.proj.weight.abs().sum() == 0 and a.blocks[0].mlp.proj.weight.abs().sum() == 0


@torch.no_grad()
def test_compiled_flex_forward_matches_sdpa_and_windows_do_not_recompile():
    """The CUDA path (compiled model, BlockMask built inside the graph) traced on CPU:
    same outputs as the dense path, and a new window value reuses the graph."""
    import torch._dynamo

    m = random_model(local_window=100, global_window=300)
    ids = packed_batch(T=512)
    m.attn_backend = "flex"
    compiled = torch.compile(m, dynamic=False, fullgraph=True)
    w1 = torch.tensor([128, 256], dtype=torch.int32)
    w2 = torch.tensor([64, 512], dtype=torch.int32)
    out1 = compiled(ids, w1)
    torch._dynamo.config.error_on_recompile = True
    try:
        out2 = compiled(ids, w2)
    finally:
        torch._dynamo.config.error_on_recompile = False
    m.attn_backend = "sdpa"
    err = max((out1 - m(ids, w1)).abs().max().item(), (out2 - m(ids, w2)).abs().max().item())
    print(f"compiled FlexAttention (CPU) vs SDPA max abs diff: {err:.3e}")
    assert err < 1e-4
