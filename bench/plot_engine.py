"""Plot bench.engine results: output tokens/s against batch size, one line per system.

    python -m bench.plot_engine RESULTS.jsonl [MORE.jsonl ...] --out docs/engine_cpu.png [--title T]

Rows are grouped by system (engine rows also by quantize / kv_cache_dtype when present).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="bench.engine JSON-lines files")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="GPT-J engine vs transformers")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = collections.defaultdict(list)
    for path in args.results:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                label = "transformers (PyTorch)" if row["system"] == "hf" else "JAX engine"
                if row.get("quantize", "none") != "none":
                    label += f" int8 weights{' + int8 KV' if row.get('kv_cache_dtype') == 'int8' else ''}"
                series[label].append((row["batch"], row["out_tok_s"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens / s")
    ax.set_title(args.title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
