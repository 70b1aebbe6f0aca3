import torch, time, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
B, H, T, D = 8, 2, 512, 32
import sys
if len(sys.argv) > 1: H, D = int(sys.argv[1]), int(sys.argv[2])
docs = (torch.arange(T) // 300)[None].expand(B, T)
i = torch.arange(T)
mask = ((docs[:, :, None] == docs[:, None, :]) & ((i[:, None] - i[None]).abs() < 128))[:, None]
def manual(q, k, v, m):
    s = (q @ k.transpose(-1, -2)) * 0.12
    s = s.masked_fill(~m, float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v
for dt in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(B, H, T, D, dtype=dt, requires_grad=True) for _ in range(3))
    for name, fn in (("flash", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.12)),
                     ("math", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.12)),
                     ("manual", lambda: manual(q, k, v, mask))):
        ctx = sdpa_kernel(SDPBackend.MATH) if name == "math" else sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
        with ctx:
            for _ in range(3): fn().sum().backward()
            tf, tb = [], []
            for _ in range(10):
                t0 = time.perf_counter(); y = fn(); t1 = time.perf_counter(); y.sum().backward(); t2 = time.perf_counter()
                tf.append(t1 - t0); tb.append(t2 - t1)
        print(dt, name, f"fwd {1000*sorted(tf)[5]:.1f} ms bwd {1000*sorted(tb)[5]:.1f} ms")
