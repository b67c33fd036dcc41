#!/usr/bin/env python3
"""Draws the benchmark plots (plain SVG, no dependencies) from sse-bench summaries.

    python3 bench/plot.py OUT_DIR RESULTS_DIR [RESULTS_DIR ...]

Each RESULTS_DIR is one `bench/results/<date>-<target>/` directory; the target (gateway, nchan,
pushpin) is read from its name. Every figure is the median over a scenario's repeats (REPEAT=3
runs; see medians.py). Writes OUT_DIR/benchmarks-latency.svg (delivery latency percentiles per
scenario and server, log scale) and OUT_DIR/benchmarks-memory.svg (idle RSS per stream per server).
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from medians import medians  # noqa: E402

COLORS = {"gateway": "#1f77b4", "nchan": "#ff7f0e", "pushpin": "#2ca02c"}
LATENCY_SCENARIOS = ["unicast-5000", "broadcast-10", "broadcast-20", "broadcast-burst"]
PERCENTILES = [("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"), ("max_us", "max")]


def load(dirs):
    """{target: {scenario: {figure: median}}}."""
    runs = {}
    for d in dirs:
        target = os.path.basename(d.rstrip("/")).rsplit("-", 1)[-1]
        for scenario, figures in medians(d).items():
            runs.setdefault(target, {})[scenario] = {
                k: v["median"] for k, v in figures.items() if isinstance(v, dict)
            }
    return runs


def svg(width, height, body, title):
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n'
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">{title}</text>\n'
        + "\n".join(body)
        + "\n</svg>\n"
    )


def legend(targets, x, y):
    out = []
    for i, t in enumerate(targets):
        out.append(f'<rect x="{x}" y="{y + i * 18}" width="12" height="12" fill="{COLORS.get(t, "#777")}"/>')
        out.append(f'<text x="{x + 18}" y="{y + i * 18 + 10}">{t}</text>')
    return out


def latency_plot(runs):
    targets = [t for t in COLORS if t in runs]
    bar = 12
    left, bottom, top, height = 90, 330, 40, 420
    per_scenario = len(PERCENTILES) * (bar * len(targets) + 4) + 16
    width = left + 6 + len(LATENCY_SCENARIOS) * per_scenario + 150
    lo, hi = 0.1, 100_000.0  # milliseconds, log scale
    y = lambda ms: bottom - (math.log10(max(ms, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (bottom - top)
    body = []
    for tick in [0.1, 1, 10, 100, 1000, 10000, 100000]:
        body.append(f'<line x1="{left}" x2="{width - 150}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        body.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g} ms</text>')
    x = left + 6
    for scenario in LATENCY_SCENARIOS:
        start = x
        for key, label in PERCENTILES:
            for t in targets:
                value = (runs[t].get(scenario) or {}).get(key)
                if value:
                    ms = value / 1000
                    body.append(
                        f'<rect x="{x}" y="{y(ms):.1f}" width="{bar - 2}" height="{bottom - y(ms):.1f}" '
                        f'fill="{COLORS[t]}"><title>{t} {scenario} {label}: {ms:.2f} ms</title></rect>'
                    )
                x += bar
            body.append(f'<text x="{x - bar * len(targets) / 2}" y="{bottom + 14}" text-anchor="middle" font-size="10">{label}</text>')
            x += 4
        body.append(f'<text x="{(start + x) / 2}" y="{bottom + 32}" text-anchor="middle">{scenario}</text>')
        x += 16
    body += legend(targets, width - 130, 50)
    return svg(width, height, body, "Delivery latency, publish to client parse (medians of 3 runs, log scale)")


def memory_plot(runs):
    targets = [t for t in COLORS if t in runs]
    rows = []
    for t in targets:
        for label in sorted(runs[t]):
            per = runs[t][label].get("rss_per_stream_bytes")
            if label.startswith("idle") and per:
                rows.append((f"{t} {label}", per / 1024, t))
    width, height, left = 700, 60 + 26 * len(rows) + 40, 210
    scale = (width - left - 100) / max([r[1] for r in rows] + [50])
    body = []
    for i, (name, kib, t) in enumerate(rows):
        yy = 50 + i * 26
        body.append(f'<text x="{left - 8}" y="{yy + 14}" text-anchor="end">{name}</text>')
        body.append(f'<rect x="{left}" y="{yy}" width="{kib * scale:.1f}" height="18" fill="{COLORS[t]}"/>')
        body.append(f'<text x="{left + kib * scale + 6:.1f}" y="{yy + 14}">{kib:.2f} KiB</text>')
    target_x = left + 4.4 * scale
    body.append(f'<line x1="{target_x:.1f}" x2="{target_x:.1f}" y1="40" y2="{height - 20}" stroke="red" stroke-dasharray="4 3"/>')
    body.append(f'<text x="{target_x + 4:.1f}" y="{height - 8}" fill="red">target 4.4 KiB</text>')
    return svg(width, height, body, "Idle RSS per stream (server process, pings on, medians of 3 runs)")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, dirs = sys.argv[1], sys.argv[2:]
    runs = load(dirs)
    with open(os.path.join(out, "benchmarks-latency.svg"), "w") as f:
        f.write(latency_plot(runs))
    with open(os.path.join(out, "benchmarks-memory.svg"), "w") as f:
        f.write(memory_plot(runs))


if __name__ == "__main__":
    main()
