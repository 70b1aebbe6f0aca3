"""model.py against references: FlexAttention vs dense SDPA, float64 gradients,
document/window isolation, heads, parameter counts."""
import pytest
import torch

from torch.nn.attention.flex_attention import BlockMask

from model import CLS_ID, PAD_ID, PRESETS, KBERT, ModelConfig, SpanHead, ClassificationHead, block_lists, block_mask, document_ids


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


@torch.no_grad()
def test_flex_attention_forward_matches_sdpa_path():
    m = random_model(local_window=100, global_window=300)
    ids = packed_batch()
    m.attn_backend = "sdpa"
    dense = m(ids)
    m.attn_backend = "flex"
    flex = m(ids)
    err = (dense - flex).abs().max().item()
    print(f"FlexAttention vs SDPA max abs diff (tiny, fp32, T=512): {err:.3e}")
    assert err < 1e-4


def test_gradients_match_float64_reference():
    m = random_model(local_window=64)
    ids = packed_batch(T=256)
    labels = torch.full_like(ids, -100)
    labels[:, 5::7] = ids[:, 5::7]
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


def test_mlm_loss_only_at_labelled_positions():
    m = random_model()
    ids = packed_batch(T=256)
    h = m(ids)
    labels = torch.full_like(ids, -100)
    labels[0, 3] = 17
    loss, correct, n = m.mlm_loss(h, labels)
    ref = torch.nn.functional.cross_entropy(m.mlm_logits(h[0, 3:4]), torch.tensor([17]))
    assert n == 1 and torch.allclose(loss, ref)
    assert m.mlm_logits(h[0]).abs().max() <= m.cfg.softcap


def test_heads_shapes_and_losses():
    h = torch.randn(3, 10, 64)
    cls = ClassificationHead(64, 3)
    logits = cls(h[:, 0])
    assert logits.shape == (3, 3) and torch.allclose(cls.loss(logits, torch.tensor([0, 1, 2])), torch.log(torch.tensor(3.0)))
    reg = ClassificationHead(64, 1)
    assert reg.loss(reg(h[:, 0]), torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx((1 + 4 + 9) / 3)
    span = SpanHead(64)
    s, e = span(h)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[:, 8:] = False
    loss = SpanHead.loss(s, e, torch.tensor([0, 1, 2]), torch.tensor([0, 3, 4]), valid)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-5)


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
