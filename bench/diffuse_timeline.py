"""Draw the timeline of a patch-parallel run from a ``bench/diffuse.py`` report: for each GPU,
its denoising steps on the compute stream and its exchanges on the NCCL stream, so that what
the compute hides (and what it waits for) can be seen.

    python bench/diffuse_timeline.py REPORT.json --size 2048 --mode pcpp --out timeline.png
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--workers", type=int, default=None, help="GPU count (default: the largest)")
    ap.add_argument("--steps", default=None, help="first,last step to draw (default: all)")
    ap.add_argument("--out", default="timeline.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in json.load(open(args.report))["modes"]
            if r["size"] == args.size and r["mode"] == args.mode and r.get("timeline")]
    if not runs:
        raise SystemExit(f"{args.report} has no timeline of {args.mode} at {args.size}²")
    run = max(runs, key=lambda r: r["workers"]) if args.workers is None else \
        next(r for r in runs if r["workers"] == args.workers)
    timelines = run["timeline"]
    first, last = (0, len(timelines[0]["steps"]) - 1) if args.steps is None else \
        (int(x) for x in args.steps.split(","))
    t0 = min(t["steps"][first][0] for t in timelines)
    t1 = max(t["steps"][last][1] for t in timelines)
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.9 * len(timelines)))
    for w, t in enumerate(timelines):
        y = 2 * (len(timelines) - 1 - w)
        steps = [(a, b - a) for a, b in t["steps"][first:last + 1]]
        ax.broken_barh([(1e3 * (a - t0), 1e3 * d) for a, d in steps], (y + 1, 0.8),
                       facecolors=["tab:blue", "tab:cyan"] * len(steps))
        swaps = [(a, b - a) for a, b in t["exchanges"] if t0 <= a <= t1]
        ax.broken_barh([(1e3 * (a - t0), 1e3 * d) for a, d in swaps], (y + 0.1, 0.8),
                       facecolors="tab:orange")
    ax.set_yticks([2 * (len(timelines) - 1 - w) + o for w in range(len(timelines)) for o in (1.5, 0.5)])
    ax.set_yticklabels([f"GPU {w} {lane}" for w in range(len(timelines))
                        for lane in ("compute", "NCCL")])
    ax.set_xlabel("ms")
    ov = run.get("overlap") or []
    hidden = ", ".join(f"GPU {w}: {o['hidden']:.0%}" for w, o in enumerate(ov) if o.get("hidden") is not None)
    ax.set_title(f"{args.mode}, {args.size}², {run['workers']} GPUs, steps {first}-{last}: "
                 f"steps (blue) and exchanges (orange); exchange time hidden by compute: {hidden}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
