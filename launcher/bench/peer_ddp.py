#!/usr/bin/env python3
"""Data-parallel peer: the model of ../shared/bench/peer_pytorch_llama.py (HF LlamaForCausalLM, bf16
autocast, fused AdamW) under torchrun with DDP or FSDP2 (fully_shard per decoder layer, then the root;
fsdp2-offload: with CPUOffloadPolicy, the sharded parameters, gradients and the AdamW step on the host,
as tessera's --zero_stage=3 --param_placement=cpu).

Run under torchrun, one process per GPU:
  torchrun --nproc_per_node=N launcher/bench/peer_ddp.py --wrap ddp --preset llama-1b --micro-batch 8

Rank 0 prints one JSON line: tokens/s per GPU and in all, model TFLOP/s and MFU per GPU, computed as
the single-GPU peer computes them (its flops_per_token, imported from that script), and peak memory.
"""
import argparse, json, os, sys, time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default=".device_bundle/peer", help="folder of peer_pytorch_llama.py")
    ap.add_argument("--wrap", choices=["ddp", "fsdp2", "fsdp2-offload"], default="ddp")
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--recompute", action="store_true", help="activation checkpointing per decoder layer")
    a = ap.parse_args()
    sys.path.insert(0, a.peer)
    from peer_pytorch_llama import PRESETS, flops_per_token
    from transformers import LlamaConfig

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    h, L, heads, kvh, ffn, vocab = PRESETS[a.preset]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kvh,
                      intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=a.seq,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    try:
        run(a, cfg, local, rank, world, vocab, flops_per_token, (h, L, ffn, vocab, kvh, heads))
    except torch.OutOfMemoryError:
        if rank == 0:
            print(json.dumps(dict(system=f"pytorch-{a.wrap}", preset=a.preset, gpus=world, seq=a.seq,
                                  micro_batch=a.micro_batch, error="OOM")), flush=True)
    dist.destroy_process_group()


def run(a, cfg, local, rank, world, vocab, flops_per_token, shape):
    from transformers import LlamaForCausalLM
    h, L, ffn, vocab, kvh, heads = shape
    model = LlamaForCausalLM(cfg).cuda()
    if a.recompute:
        model.gradient_checkpointing_enable()
    if a.wrap == "ddp":
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
    else:
        from torch.distributed.fsdp import fully_shard
        kw = {}
        if a.wrap == "fsdp2-offload":
            from torch.distributed.fsdp import CPUOffloadPolicy
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        fwd = model
    # (Offloaded: the parameters are host tensors, and the fused AdamW runs on the CPU.)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1 + rank)
    data = torch.randint(0, vocab, (a.micro_batch, a.seq + 1), device="cuda", generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tok_gpu = a.micro_batch * a.seq / dt
    fpt, _ = flops_per_token(h, L, ffn, vocab, kvh, heads, a.seq)
    tflops = tok_gpu * fpt / 1e12
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps(dict(system=f"pytorch-{a.wrap}", preset=a.preset, gpus=world, seq=a.seq,
                              micro_batch=a.micro_batch, step_s=round(dt, 4),
                              tokens_per_s_per_gpu=round(tok_gpu, 1), tokens_per_s=round(tok_gpu * world, 1),
                              model_tflops_per_gpu=round(tflops, 1), mfu=round(tflops / a.peak_tflops, 4),
                              peak_mem_gib=round(float(peak), 2), loss=round(float(loss), 4))), flush=True)


if __name__ == "__main__":
    main()
