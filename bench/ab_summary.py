#!/usr/bin/env python3
"""One line per LoRA-step record of results*.jsonl files: which code, tokens/s (median step), mean
step, slowest step, peak GiB, first losses, the host's queueing share and GC pauses where recorded.

    python bench/ab_summary.py $OUT/results.jsonl $OUT/results-base.jsonl
"""
import json
import statistics
import sys


def main(paths):
    for path in paths:
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        tag = "base" if "base" in path else "this"
        for line in lines:
            r = json.loads(line)
            if r.get("kind") != "bench":
                continue
            warm = r.get("warmup", 3)
            timed = r["step_times_s"][warm:]
            queued = (r.get("host_queued_s") or [])[warm:]
            gc = [p[0] for p in (r.get("gc_pauses_by_step") or [])[warm:]]
            print(f"{tag} {r['model']}:{r['quant']}:{r['seq']} {r['tokens_per_s']:>9} tok/s "
                  f"median {statistics.median(timed) * 1e3:6.1f} ms mean {statistics.mean(timed) * 1e3:6.1f} "
                  f"max {max(timed) * 1e3:6.1f} | peak {r['peak_alloc_gib']} GiB | losses {r['losses'][:3]} | "
                  f"host queued median {statistics.median(queued) * 1e3 if queued else float('nan'):6.1f} ms"
                  + (f" | GC ms total {sum(gc):.0f}, max {max(gc):.0f}" if gc else ""))
            for row in r.get("ab_variants") or []:  # --ab-switch: each variant beside the defaults
                print(f"    {row['tok_s']:>9} tok/s  host {row['host_ms']:6.1f} ms  peak {row['peak_alloc_gib']} GiB"
                      f"  ({row['steps']} steps)  {row['switch']}")


if __name__ == "__main__":
    main(sys.argv[1:])
