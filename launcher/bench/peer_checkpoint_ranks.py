#!/usr/bin/env python3
"""Sharded-checkpoint peer: how PyTorch saves state sharded over N ranks (FSDP2's sharded state dict)
-- every rank's part of the fp32 weights and AdamW moments of ../shared/bench/peer_pytorch_llama.py's
model as DTensors sharded on dim 0, written by torch.distributed.checkpoint (DCP), each rank its own
file, then fsynced (tessera's saves are fsynced). CPU ranks over Gloo, as tessera's CPU ranks in
tests/gpu/run_sharded_checkpoint_on_device.sh, so both write the same bytes to the same disk.
Rank 0 prints one JSON line: ranks, bytes, seconds (DCP's save, fsync and a barrier), GB/s.

  python3 -m torch.distributed.run --nproc-per-node 4 launcher/bench/peer_checkpoint_ranks.py \
      --preset llama-1b --dir /tmp/peer_ckpt
"""
import argparse, glob, json, os, shutil, sys, time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard


def shapes(h, layers, heads, kv_heads, ffn, vocab):
    """The HF LlamaForCausalLM parameters (untied embeddings), name -> shape."""
    kv = kv_heads * (h // heads)
    out = {"model.embed_tokens.weight": (vocab, h)}
    for l in range(layers):
        p = f"model.layers.{l}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                    p + "mlp.down_proj.weight": (h, ffn), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default=".device_bundle/peer", help="folder of peer_pytorch_llama.py")
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--dir", default="/tmp/peer_ckpt")
    a = ap.parse_args()
    sys.path.insert(0, a.peer)
    from peer_pytorch_llama import PRESETS

    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (n,))
    model, optim = {}, {}
    torch.manual_seed(rank)
    for name, shape in shapes(*PRESETS[a.preset]).items():
        assert shape[0] % n == 0, f"{name} {shape}: rows not divisible by {n} ranks"
        local = (shape[0] // n,) + tuple(shape[1:])
        part = lambda: DTensor.from_local(torch.rand(local), mesh, [Shard(0)], run_check=False)
        model[name] = part()
        optim[name] = {"exp_avg": part(), "exp_avg_sq": part()}
    state = {"model": model, "optim": {"state": optim}}
    if rank == 0:
        shutil.rmtree(a.dir, ignore_errors=True)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.save(state, checkpoint_id=a.dir)
    mine = glob.glob(os.path.join(a.dir, f"__{rank}_*")) + ([os.path.join(a.dir, ".metadata")] if rank == 0 else [])
    for f in mine:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    dist.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        nbytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(a.dir, "*")) + [os.path.join(a.dir, ".metadata")])
        print(json.dumps(dict(system="pytorch", method="dcp sharded", preset=a.preset, ranks=n, bytes=nbytes,
                              seconds=round(dt, 3), gb_per_s=round(nbytes / dt / 1e9, 3))), flush=True)
        shutil.rmtree(a.dir, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
