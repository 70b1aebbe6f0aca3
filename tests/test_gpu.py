"""CUDA-only checks (skipped without a GPU): compiled FlexAttention forward+backward of
KBERT-base against the SDPA path in bf16, windows changing without recompiling, and the
time of a training step at 8,192 tokens."""
import statistics
import time

import pytest
import torch

from model import CLS_ID, PAD_ID, KBERT, ModelConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def base_model_and_batch(T=8192, seed=0):
    torch.manual_seed(seed)
    m = KBERT(ModelConfig(preset="base")).cuda()
    with torch.no_grad():  # non-zero output projections so attention matters
        for b in m.blocks:
            b.attn.proj.weight.normal_(std=0.02)
            b.mlp.proj.weight.normal_(std=0.02)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (1, T), generator=g)
    starts = torch.randint(1, T - 300, (7,), generator=g)
    ids[0, 0] = CLS_ID
    ids[0, starts] = CLS_ID
    ids[0, T - 200:] = PAD_ID
    labels = torch.full_like(ids, -100)
    labels[:, 1::5] = ids[:, 1::5]
    labels[ids >= CLS_ID] = -100
    return m, ids.cuda(), labels.cuda()


def loss_and_grads(m, ids, labels, windows, encoder):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = encoder(ids, windows)
        loss, _, _ = m.mlm_loss(h, labels)
    loss.backward()
    return h.float(), loss.item(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}


def test_compiled_flex_matches_sdpa_in_bf16():
    m, ids, labels = base_model_and_batch()
    windows = torch.tensor([128, 4096], dtype=torch.int32, device="cuda")
    m.attn_backend = "flex"
    h_flex, loss_flex, g_flex = loss_and_grads(m, ids, labels, windows, torch.compile(m, dynamic=False, fullgraph=True))
    m.attn_backend = "sdpa"
    h_sdpa, loss_sdpa, g_sdpa = loss_and_grads(m, ids, labels, windows, m)
    real = ids[0] != PAD_ID
    err = (h_flex - h_sdpa)[0, real].abs().max().item()
    grad_rel = max(((g_flex[n] - g_sdpa[n]).norm() / g_sdpa[n].norm().clamp_min(1e-12)).item() for n in g_sdpa)
    print(f"\nKBERT-base T=8192 bf16: FlexAttention (compiled) vs SDPA hidden max abs diff {err:.3e}, "
          f"loss {loss_flex:.5f} vs {loss_sdpa:.5f}, worst grad relative diff {grad_rel:.3e}")
    assert err < 0.1 and abs(loss_flex - loss_sdpa) < 1e-2 and grad_rel < 5e-2


def test_windows_change_without_recompiling_and_step_time():
    import torch._dynamo

    from trainer import TrainConfig, build_optimizer, make_forward

    m, ids, labels = base_model_and_batch(seed=1)
    forward = make_forward(m, compile=True)
    opt = build_optimizer(m, TrainConfig())

    def step(windows):
        loss, _, _ = forward(ids, labels, torch.tensor(windows, dtype=torch.int32, device="cuda"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step([128, 1024])
    step([128, 1024])
    torch._dynamo.config.error_on_recompile = True
    try:
        step([256, 2048])  # a grown window: same graph
        times = []
        for i in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step([128, 8192])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        torch._dynamo.config.error_on_recompile = False
    ms = 1000 * statistics.median(times)
    print(f"\nKBERT-base training step (fwd+bwd+MuonAdamW) at 8,192 tokens on {torch.cuda.get_device_name()}: "
          f"median {ms:.1f} ms over 20 steps = {8192 / ms * 1000:.0f} tokens/s")
