"""Prints the harness's table (markdown) from the files harness.sh wrote into a folder."""
import glob
import json
import os
import sys


def last_json(path):
    try:
        lines = [l for l in open(path) if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def main(folder):
    rows = ["| shape | system | tokens/s | model TFLOP/s | MFU | peak memory GiB | tokens/s ratio (tessera / this) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(glob.glob(os.path.join(folder, "tessera_*.jsonl"))):
        tag = os.path.basename(path)[len("tessera_"):-len(".jsonl")]
        ours = last_json(path)
        if ours is None:
            rows.append(f"| {tag} | tessera | failed (see tessera_{tag}.log) | | | | |")
            continue
        tps = ours["tokens_per_s"]
        rows.append(f"| {tag} | tessera | {tps:,.0f} | {ours['model_tflops']:.1f} | "
                    f"{100 * ours.get('mfu', 0):.1f}% | {ours['mem_peak_bytes'] / 2**30:.2f} | |")
        for kind in ("eager", "compile"):
            peer = last_json(os.path.join(folder, f"peer_{kind}_{tag}.json"))
            if peer is None:
                continue
            rows.append(f"| {tag} | {peer['system']} | {peer['tokens_per_s']:,.0f} | "
                        f"{peer['model_tflops']:.1f} | {100 * peer['mfu']:.1f}% | "
                        f"{peer['peak_mem_gib']:.2f} | **{tps / peer['tokens_per_s']:.2f}** |")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_out")
