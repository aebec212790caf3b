#!/usr/bin/env python3
"""Parity of tessera's LLaMA with Hugging Face transformers' LlamaForCausalLM.

Runs where torch and transformers are installed (the GPU machine). It
  1. builds a random LlamaForCausalLM (grouped-query attention on, untied embeddings) and saves it
     with save_pretrained (safetensors);
  2. runs tessera's `llama_parity` tool on the same checkpoint and tokens, which writes logits, the
     mean loss and every parameter gradient (under Hugging Face names), and exports tessera's copy of
     the weights as a Hugging Face checkpoint;
  3. runs Hugging Face's forward and backward in fp32 on the same tokens and compares;
  4. loads tessera's export with from_pretrained and checks it gives the same logits.
Prints one JSON line per comparison and exits non-zero if any is out of tolerance.

  python3 tests/hf_parity/hf_parity.py --tool .device_bundle/bin/llama_parity --work /tmp/parity
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM


def rel(a, b):
    return float((a - b).float().norm() / (b.float().norm() + 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--work", default="/tmp/tessera_parity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    # head_dim = hidden / heads: 32 runs the simple attention kernels; 64 and 128 (bf16) the flash ones.
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=688, num_hidden_layers=3,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=1000,
                      max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).float()
    # Non-trivial norm weights, so that their gradients and scaling are really compared.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    hf_dir = os.path.join(a.work, "hf_model")
    model.save_pretrained(hf_dir, safe_serialization=True)

    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    targets[0, 5] = -100  # an ignored position
    tok_path = os.path.join(a.work, "tokens.safetensors")
    save_file({"input_ids": inputs.to(torch.int32), "labels": targets.to(torch.int32)}, tok_path)

    # Hugging Face in fp32 (on the GPU when there is one), as the reference.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    m = model.to(dev)
    logits = m(input_ids=inputs.to(dev)).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size).float(),
                                             targets.to(dev).view(-1), ignore_index=-100)
    loss.backward()
    ref_logits = logits.detach().float().cpu()
    ref_grads = {n: p.grad.detach().float().cpu() for n, p in m.named_parameters()}

    results, ok = [], True
    tolerances = {"f32": dict(logits=1e-4, loss=1e-5, grad=1e-3),
                  "bf16": dict(logits=2e-2, loss=5e-3, grad=5e-2)}
    for dtype, tol in tolerances.items():
        out = os.path.join(a.work, f"tessera_{dtype}.safetensors")
        export = os.path.join(a.work, f"export_{dtype}")
        cmd = [a.tool, f"--hf_dir={hf_dir}", f"--tokens={tok_path}", f"--out={out}",
               f"--dtype={dtype}", f"--export_dir={export}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            print(json.dumps({"dtype": dtype, "error": "llama_parity failed", "rc": r.returncode}))
            ok = False
            continue
        got = load_file(out)
        row = dict(dtype=dtype, device=dev)
        row["logits_rel_err"] = rel(got["logits"], ref_logits)
        row["logits_max_abs_err"] = float((got["logits"] - ref_logits).abs().max())
        row["loss_tessera"] = float(got["loss"][0])
        row["loss_hf"] = float(loss)
        row["loss_abs_err"] = abs(row["loss_tessera"] - row["loss_hf"])
        grad_errs = {n: rel(got["grad." + n], g) for n, g in ref_grads.items()}
        worst = max(grad_errs, key=grad_errs.get)
        row["grad_max_rel_err"] = grad_errs[worst]
        row["grad_worst_param"] = worst
        row["grads_compared"] = len(grad_errs)
        # The export must load in Hugging Face and give tessera's logits.
        back = LlamaForCausalLM.from_pretrained(export, dtype=torch.float32).to(dev)
        with torch.no_grad():
            exp_logits = back(input_ids=inputs.to(dev)).logits.float().cpu()
        row["export_logits_rel_err_vs_hf"] = rel(exp_logits, ref_logits)
        row["pass"] = (row["logits_rel_err"] < tol["logits"] and row["loss_abs_err"] < tol["loss"]
                       and row["grad_max_rel_err"] < tol["grad"]
                       and row["export_logits_rel_err_vs_hf"] < 1e-5)
        row["tolerances"] = tol
        ok &= row["pass"]
        print(json.dumps(row), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
