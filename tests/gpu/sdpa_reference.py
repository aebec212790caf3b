"""PyTorch's scaled_dot_product_attention backends at the llama-1b attention shape (causal, bf16,
b 4, 16 heads, seq 2048, head_dim 128): what this machine's vendor kernels reach, for comparison
with attention_bench's figures (same FLOP count: forward 4*b*h*s*s*d/2, backward 2.5x)."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

b, h, s, d = 4, 16, 2048, 128
q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
fwd_flop = 4 * b * h * s * s * d / 2


def ms(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                      ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
    try:
        with sdpa_kernel(backend):
            f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            fwd = ms(f)
            o = f()
            both = ms(lambda: torch.autograd.grad(f(), (q, k, v), do))
        bwd = both - fwd
        print(f'{{"backend": "{name}", "fwd_ms": {fwd:.3f}, "bwd_ms": {bwd:.3f}, '
              f'"fwd_tflops": {fwd_flop / fwd / 1e9:.1f}, "bwd_tflops": {2.5 * fwd_flop / bwd / 1e9:.1f}}}')
    except Exception as e:  # a backend this build or GPU lacks
        print(f'{{"backend": "{name}", "error": "{type(e).__name__}: {str(e)[:200]}"}}')
