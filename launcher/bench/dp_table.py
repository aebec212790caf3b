#!/usr/bin/env python3
"""The table of launcher/bench/dp_scaling.sh from its folder: tessera's metrics (JSONL, mean over the
records after the first, which holds the warm-up steps) and the peers' JSON lines. A run that
stopped (out of memory, say) is a row with its error. Scaling efficiency: per-GPU tokens/s against
the same configuration on one GPU -- for the ZeRO stages, tessera without a communicator
(g1_single) when it ran; for the peers, the same system on one GPU."""
import glob, json, os, re, sys


def tessera(path):
    recs = [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []
    recs = recs[1:] or recs
    if not recs:
        return None
    ranks = recs[-1].get("ranks", 1)
    mean = lambda k: sum(r.get(k, 0) for r in recs) / len(recs)
    return dict(gpus=ranks, tok_gpu=mean("tokens_per_s") / ranks, mfu=mean("mfu"),
                exposed=mean("comm_exposed_s") if "comm_exposed_s" in recs[-1] else None,
                mem=max(r["mem_peak_bytes"] for r in recs) / 2**30, loss=recs[-1]["loss"])


def first_error(log):
    try:
        for line in open(log, errors="replace"):
            if re.search(r"RESOURCE_EXHAUSTED|INVALID_ARGUMENT|UNIMPLEMENTED|INTERNAL|rror", line):
                return re.sub(r"^\[rank \d+\] [IWEF]\d+ [\d:.]+ +\d+ [\w.]+:\d+\] ", "", line.strip())[:160]
    except OSError:
        pass
    return "no metrics"


def main(d):
    rows = []  # (name, config key, gpus, result or None, error)
    tags = {re.sub(r"^tessera_|\.(log|jsonl)$", "", os.path.basename(f))
            for f in glob.glob(os.path.join(d, "tessera_*.log")) + glob.glob(os.path.join(d, "tessera_*.jsonl"))}
    for tag in sorted(tags):
        log = os.path.join(d, f"tessera_{tag}.log")
        m = re.match(r"g(\d+)_(.+)", tag)
        gpus, config = (int(m.group(1)), m.group(2)) if m else (1, tag)
        r = tessera(os.path.join(d, f"tessera_{tag}.jsonl"))
        rows.append(("tessera " + tag, "tessera " + config, gpus, r, None if r else first_error(log)))
    for f in sorted(glob.glob(os.path.join(d, "peer_*.json"))):
        try:
            p = json.loads(open(f).read().strip().splitlines()[-1])
        except (IndexError, ValueError):
            m = re.match(r"peer_(.+)_(\d+)\.json", os.path.basename(f))
            if m:
                rows.append(("pytorch-" + m.group(1), "pytorch-" + m.group(1), int(m.group(2)), None, "no result"))
            continue
        if "error" in p:
            rows.append((p["system"], p["system"], p["gpus"], None, p["error"]))
            continue
        rows.append((p["system"], p["system"], p["gpus"], dict(gpus=p["gpus"], tok_gpu=p["tokens_per_s_per_gpu"],
                     mfu=p["mfu"], exposed=None, mem=p["peak_mem_gib"], loss=p["loss"]), None))
    base = {key: r["tok_gpu"] for _, key, gpus, r, _ in rows if gpus == 1 and r}
    single = base.get("tessera single")
    print("| run | GPUs | tokens/s per GPU | MFU | scaling efficiency | comm exposed s/step | peak GiB | last loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, key, gpus, r, err in sorted(rows, key=lambda x: (not x[0].startswith("tessera"), x[1], x[2])):
        if r is None:
            print(f"| {name} | {gpus} | did not run: {err} | | | | | |")
            continue
        ref = single if single and re.match(r"tessera z\d", key) else base.get(key)
        eff = f"{r['tok_gpu'] / ref:.3f}" if ref else ""
        exposed = "" if r["exposed"] is None else f"{r['exposed']:.4f}"
        print(f"| {name} | {gpus} | {r['tok_gpu']:,.0f} | {100 * r['mfu']:.1f}% | {eff} | {exposed} | "
              f"{r['mem']:.1f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_out/dp")
