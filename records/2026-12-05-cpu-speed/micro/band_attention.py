import sys, time, torch
sys.path.insert(0, ".")
torch.set_num_threads(1)
import torch.nn.functional as F
from model import banded_mask, banded_attention, dense_mask, document_ids, CLS_ID
B, H, T, D = 8, 2, int(sys.argv[1]), int(sys.argv[2])
ids = torch.randint(0, 50000, (B, T)); ids[:, ::700] = CLS_ID
docs = document_ids(ids)
w = torch.tensor(128)
for dt in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(B, H, T, D, dtype=dt, requires_grad=True) for _ in range(3))
    def dense():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(docs, w), scale=0.12)
    def band():
        return banded_attention(q, k, v, banded_mask(docs, w, 128), 0.12)
    for name, fn in (("dense", dense), ("banded", band)):
        for _ in range(3): fn().sum().backward()
        ts = []
        for _ in range(10):
            t0 = time.perf_counter(); fn().sum().backward(); ts.append(time.perf_counter() - t0)
        print(T, D, dt, name, f"fwd+bwd {1000*sorted(ts)[5]:.1f} ms")
