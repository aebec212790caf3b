#!/usr/bin/env python3
"""The table of launcher/bench/dp_scaling.sh from its folder: tessera's metrics (JSONL, mean over the
records after the first, which holds the warm-up steps) and the peers' JSON lines."""
import glob, json, os, re, sys


def tessera(path):
    recs = [json.loads(l) for l in open(path) if l.strip()]
    recs = recs[1:] or recs
    if not recs:
        return None
    ranks = recs[-1].get("ranks", 1)
    mean = lambda k: sum(r.get(k, 0) for r in recs) / len(recs)
    return dict(gpus=ranks, tok_gpu=mean("tokens_per_s") / ranks, mfu=mean("mfu"),
                exposed=mean("comm_exposed_s") if "comm_exposed_s" in recs[-1] else None,
                mem=max(r["mem_peak_bytes"] for r in recs) / 2**30, loss=recs[-1]["loss"])


def main(d):
    rows = []
    for f in sorted(glob.glob(os.path.join(d, "tessera_*.jsonl"))):
        tag = re.sub(r"^tessera_|\.jsonl$", "", os.path.basename(f))
        r = tessera(f)
        if r:
            rows.append(("tessera " + tag, r))
    for f in sorted(glob.glob(os.path.join(d, "peer_*.json"))):
        try:
            p = json.loads(open(f).read().strip().splitlines()[-1])
        except (IndexError, ValueError):
            continue
        rows.append((p["system"], dict(gpus=p["gpus"], tok_gpu=p["tokens_per_s_per_gpu"], mfu=p["mfu"],
                                       exposed=None, mem=p["peak_mem_gib"], loss=p["loss"])))
    # Scaling efficiency: per-GPU tokens/s against the same system's one-GPU figure (tessera: the run
    # without a communicator).
    base = {}
    for name, r in rows:
        if r["gpus"] == 1:
            key = "tessera" if name.startswith("tessera") else name
            if name == "tessera g1_single" or key not in base:
                base[key] = r["tok_gpu"]
    print("| run | GPUs | tokens/s per GPU | MFU | scaling efficiency | comm exposed s/step | peak GiB | last loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        key = "tessera" if name.startswith("tessera") else name
        eff = r["tok_gpu"] / base[key] if key in base else float("nan")
        exposed = "" if r["exposed"] is None else f"{r['exposed']:.4f}"
        print(f"| {name} | {r['gpus']} | {r['tok_gpu']:,.0f} | {100 * r['mfu']:.1f}% | {eff:.3f} | {exposed} | "
              f"{r['mem']:.1f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_out/dp")
