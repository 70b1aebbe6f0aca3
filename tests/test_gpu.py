"""CUDA-only checks (skipped without a GPU), one compile for all of them: KBERT-base at
8,192 tokens through trainer.py's compiled path (FlexAttention) against the SDPA path in
bf16 (outputs, loss, gradients), windows changing without recompiling, and the median time
of a training step."""
import statistics
import time

import pytest
import torch

from model import CLS_ID, PAD_ID, KBERT, ModelConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_flex_matches_sdpa_no_recompiles_and_step_time():
    import torch._dynamo

    from trainer import TrainConfig, build_optimizer, make_forward

    torch.manual_seed(0)
    m = KBERT(ModelConfig(preset="base")).cuda()
    with torch.no_grad():  # non-zero output projections so attention matters
        for b in m.blocks:
            b.attn.proj.weight.normal_(std=0.02)
            b.mlp.proj.weight.normal_(std=0.02)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50000, (1, 8192), generator=g)
    ids[0, 0] = CLS_ID
    ids[0, torch.randint(1, 7900, (7,), generator=g)] = CLS_ID
    ids[0, 8000:] = PAD_ID
    labels = torch.full_like(ids, -100)
    labels[:, 1::5] = ids[:, 1::5]
    labels[ids >= CLS_ID] = -100
    ids, labels = ids.cuda(), labels.cuda()
    windows = torch.tensor([128, 4096], dtype=torch.int32, device="cuda")

    def grads():
        return {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    # the SDPA path (dense mask from the same mask_mod), eager, bf16 autocast
    m.attn_backend = "sdpa"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h_ref = m(ids, windows).float()
        loss_ref, _, _ = m.mlm_loss(m(ids, windows), labels)
    loss_ref.backward()
    g_ref = grads()
    m.zero_grad(set_to_none=True)
    # trainer.py's path: compiled encoder with FlexAttention + compiled MLM head
    m.attn_backend = "flex"
    forward = make_forward(m, compile=True)
    loss, _, _ = forward(ids, labels, windows)
    loss.backward()
    g_flex = grads()
    m.zero_grad(set_to_none=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        h_flex = torch.compile(m, dynamic=False, fullgraph=True)(ids, windows).float()
    real = ids[0] != PAD_ID
    err = (h_flex - h_ref)[0, real].abs().max().item()
    grad_rel = max(((g_flex[n] - g_ref[n]).norm() / g_ref[n].norm().clamp_min(1e-12)).item() for n in g_ref)
    print(f"\nKBERT-base T=8192 bf16: compiled FlexAttention vs SDPA: hidden max abs diff {err:.3e}, "
          f"loss {loss.item():.5f} vs {loss_ref.item():.5f}, worst parameter-gradient relative diff {grad_rel:.3e}")
    assert err < 0.1 and abs(loss.item() - loss_ref.item()) < 1e-2 and grad_rel < 5e-2

    opt = build_optimizer(m, TrainConfig())

    def step(w):
        loss, _, _ = forward(ids, labels, torch.tensor(w, dtype=torch.int32, device="cuda"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step([128, 1024])
    torch._dynamo.config.error_on_recompile = True
    try:
        step([256, 2048])  # grown windows: the same graphs
        times = []
        for _ in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step([128, 8192])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        torch._dynamo.config.error_on_recompile = False
    ms = 1000 * statistics.median(times)
    print(f"KBERT-base training step (fwd+bwd+MuonAdamW) at 8,192 tokens on {torch.cuda.get_device_name()}: "
          f"median {ms:.1f} ms over 20 steps = {8192 / ms * 1000:.0f} tokens/s")
