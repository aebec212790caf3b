#!/usr/bin/env python3
"""Peer for gemm_smoke's timing cases: torch.matmul on the same shapes, timed the same way
(3 warm-ups, then 20 back-to-back products between two CUDA events). One JSON line per case."""
import json
import torch

CASES = [  # m=n=k, input dtype, output dtype, tf32
    (4096, torch.bfloat16, torch.bfloat16, False),
    (8192, torch.bfloat16, torch.bfloat16, False),
    (4096, torch.float32, torch.float32, False),
    (4096, torch.float32, torch.float32, True),
]

for size, dt, out_dt, tf32 in CASES:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(size, size, device="cuda", dtype=dt)
    b = torch.randn(size, size, device="cuda", dtype=dt)  # used as B^T, like a Linear weight
    for _ in range(3):
        c = a @ b.t()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        c = a @ b.t()
    stop.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / 20
    print(json.dumps({"case": "peer_torch_matmul", "m": size, "n": size, "k": size,
                      "ab": str(dt).replace("torch.", ""), "tf32": int(tf32), "ms": round(ms, 4),
                      "tflops": round(2 * size**3 / (ms * 1e-3) / 1e12, 1),
                      "torch": torch.__version__}), flush=True)
