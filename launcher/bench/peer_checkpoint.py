#!/usr/bin/env python3
"""Checkpoint peer: how a PyTorch user saves the model of ../shared/bench/peer_pytorch_llama.py (HF
LlamaForCausalLM, fp32 weights, fused AdamW on the GPU) after a training step -- torch.save of the
model's and optimizer's state dicts, and torch.distributed.checkpoint (DCP) to a directory -- each
followed by fsync of what it wrote (tessera's saves are fsynced: without it a save measures the page
cache, not the disk). Prints one JSON line per method: bytes, seconds (with the fsync), GB/s, and the
process's peak resident set before and after the save (ru_maxrss).

  python3 launcher/bench/peer_checkpoint.py --preset llama-1b --dir /tmp/peer_ckpt
"""
import argparse, json, os, resource, shutil, sys, time

import torch


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fsync_tree(path):
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        total += os.path.getsize(f)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default=".device_bundle/peer", help="folder of peer_pytorch_llama.py")
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dir", default="/tmp/peer_ckpt")
    ap.add_argument("--methods", nargs="+", default=["torch.save", "dcp"])
    a = ap.parse_args()
    sys.path.insert(0, a.peer)
    from peer_pytorch_llama import PRESETS
    from transformers import LlamaConfig, LlamaForCausalLM

    h, L, heads, kvh, ffn, vocab = PRESETS[a.preset]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kvh,
                      intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=a.seq,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (1, a.seq + 1), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=x[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), x[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    for method in a.methods:
        shutil.rmtree(a.dir, ignore_errors=True)
        os.makedirs(a.dir)
        before = peak_rss_bytes()
        t0 = time.perf_counter()
        if method == "torch.save":
            path = os.path.join(a.dir, "checkpoint.pt")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        else:
            import torch.distributed.checkpoint as dcp
            path = os.path.join(a.dir, "dcp")
            dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=path)
        t_write = time.perf_counter() - t0
        nbytes = fsync_tree(path)
        dt = time.perf_counter() - t0
        print(json.dumps(dict(system="pytorch", method=method, preset=a.preset, bytes=nbytes, seconds=round(dt, 3),
                              seconds_without_fsync=round(t_write, 3), gb_per_s=round(nbytes / dt / 1e9, 3),
                              peak_rss_before=before, peak_rss_after=peak_rss_bytes())), flush=True)
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
