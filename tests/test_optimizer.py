"""optimizer.py against references: SVD polar factor, plain Muon/AdamW steps, and
torchrun 2 processes (gloo) against 1 process."""
import os
import re
import subprocess
import sys

import pytest
import torch

from optimizer import MuonAdamW, orthogonalize

# matrix shapes of KBERT-base (qkv, attention out, MLP in, MLP out) and a square tiny one
SHAPES = [(2304, 768), (768, 768), (2048, 768), (768, 2048), (64, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_matches_svd_polar_factor(dtype):
    torch.manual_seed(0)
    for shape in SHAPES:
        G = torch.randn(shape)
        U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        polar = U @ Vh
        O = orthogonalize(G, dtype=dtype).double()
        rel = ((O - polar).norm() / polar.norm()).item()
        cos = ((O * polar).sum() / (O.norm() * polar.norm())).item()
        s = torch.linalg.svdvals(O)
        print(f"{shape} {dtype}: rel err {rel:.4f}, cosine {cos:.5f}, singular values [{s.min():.3f}, {s.max():.3f}]")
        assert O.shape == G.shape
        assert rel < 0.15 and cos > 0.99
        assert s.max() < 1.2
        if shape[0] != shape[1]:  # rectangular Gaussians are well conditioned: all sv near 1
            assert s.min() > 0.8


def test_orthogonalize_batched_equals_single():
    G = torch.randn(3, 96, 32)
    batched = orthogonalize(G)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(G[i]))


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 32), (48, 32), (48, 32), (32, 80), (16,), (100, 8)]  # three of one shape: padding
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def make_grads(step, rank=None, world=1, seed=1):
    """Per-parameter gradients; `rank` selects that rank's part of a mean over `world` parts."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    shapes = [(48, 32), (48, 32), (48, 32), (32, 80), (16,), (100, 8)]
    parts = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
    if rank is None:
        return [(a + b) / 2 for a, b in zip(*parts)]
    return parts[rank]


def build(params, lr=0.02, ortho_dtype=None):
    return MuonAdamW([
        dict(kind="muon", params=params[:4], lr=lr, momentum=0.9, weight_decay=0.1),
        dict(kind="adamw", params=params[4:], lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.01),
    ], params_expected=params, ortho_dtype=ortho_dtype)


@pytest.mark.parametrize("ortho_dtype", [None, torch.bfloat16])  # None: fp32 on CPU
def test_one_step_matches_plain_reference(ortho_dtype):
    params = make_params()
    ref = [p.detach().clone() for p in params]
    opt = build(params, ortho_dtype=ortho_dtype)
    torch_adam = torch.optim.AdamW([torch.nn.Parameter(r) for r in ref[4:]], lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.01)
    bufs = [torch.zeros_like(r) for r in ref[:4]]
    for step in range(3):
        grads = make_grads(step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        # plain Muon, one matrix at a time (momentum 0.9 with Nesterov look-ahead, written as lerps
        # like the optimizer so bf16 orthogonalisation sees the same input bits)
        for i in range(4):
            bufs[i] = bufs[i].lerp(grads[i], 0.1)  # 0.9 buf + 0.1 grad
            nesterov = grads[i].lerp(bufs[i], 0.9)  # 0.1 grad + 0.9 buf
            scale = max(1.0, ref[i].shape[0] / ref[i].shape[1]) ** 0.5
            ref[i] = ref[i] * (1 - 0.02 * 0.1) - 0.02 * scale * orthogonalize(nesterov, ortho_dtype).float()
        for p, g in zip(torch_adam.param_groups[0]["params"], grads[4:]):
            p.grad = g.clone()
        torch_adam.step()
    for i in range(4):
        torch.testing.assert_close(params[i].detach(), ref[i], rtol=1e-5, atol=1e-6)
    for p, q in zip(params[4:], torch_adam.param_groups[0]["params"]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_every_parameter_in_exactly_one_group():
    params = make_params()
    with pytest.raises((AssertionError, ValueError), match="more than one"):
        MuonAdamW([dict(kind="muon", params=params[:2]), dict(kind="adamw", params=params[1:])])
    with pytest.raises(AssertionError, match="no group"):
        MuonAdamW([dict(kind="muon", params=params[:2])], params_expected=params)
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(kind="muon", params=params[4:5])])
    with pytest.raises(ValueError, match="unknown keys"):
        MuonAdamW([dict(kind="adamw", params=params[4:], momentum=0.9)])


def run_steps(rank=None, world=1, steps=4):
    params = make_params()
    opt = build(params)
    for step in range(steps):
        for p, g in zip(params, make_grads(step, rank, world)):
            p.grad = g
        opt.step()
    return params, opt


def test_state_dict_round_trip_resumes_identically(tmp_path):
    params, opt = run_steps(steps=2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    copy = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = build(copy)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for step in range(2, 4):
        for ps, o in ((params, opt), (copy, opt2)):
            for p, g in zip(ps, make_grads(step)):
                p.grad = g
            o.step()
    for p, q in zip(params, copy):
        assert torch.equal(p, q)


def test_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): each rank holds half of the gradient; after 4
    steps the weights and the gathered optimizer state equal a single process's. The AdamW
    moments are compared too: Adam's update barely changes when every gradient is scaled
    (the world size not divided out, say), its moments do."""
    out = tmp_path / "dist.pt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(os.path.dirname(__file__), "dist_optimizer_worker.py"), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the default group is freed on destroy (its threads do not race interpreter exit)
    if sys.platform == "linux":
        threads = sorted(re.findall(r"rank (\d) gloo threads after cleanup: (\d+)", r.stdout))
        assert threads == [("0", "0"), ("1", "0")], r.stdout
    got = torch.load(out, weights_only=True)
    params, opt = run_steps()
    state = opt.state_dict()
    worst = max((a - b.detach()).abs().max().item() for a, b in zip(got["params"], params))
    moments = max((a[k] - b[k]).abs().max().item() for a, b in zip(got["state"]["adamw"], state["adamw"])
                  for k in ("exp_avg", "exp_avg_sq"))
    print(f"1 vs 2 processes, 4 steps: max abs difference of the weights {worst:.2e}, of the AdamW moments {moments:.2e}")
    assert worst < 1e-5
    for a, b in zip(got["state"]["muon_momentum"], state["muon_momentum"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got["state"]["adamw"], state["adamw"], strict=True):
        assert a["step"] == b["step"] == 4
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
