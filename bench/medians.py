#!/usr/bin/env python3
"""Medians of repeated runs, from sse-bench summaries (no dependencies).

    python3 bench/medians.py RESULTS_DIR [RESULTS_DIR ...]

A run made with REPEAT=n writes `<scenario>-r1.json` ... `<scenario>-rn.json`; this takes, figure by
figure, the median over the repeats of each scenario and writes RESULTS_DIR/medians.json:

    {"<scenario>": {"runs": n, "<figure>": {"median": m, "runs": [v1, ..., vn]}, ...}, ...}

A scenario run once counts as one repeat. Per-process parts (`*.partN.json`) are skipped: the
merged summary beside them is the run. `plot.py` and the tables in docs/benchmarks.md read these
medians.
"""

import glob
import json
import os
import re
import statistics
import sys

# (figure, path into the summary). A figure missing from a run is left out of its median.
FIGURES = [
    ("streams_ok", "connections.ok"),
    ("streams_failed", "connections.failed"),
    ("connect_rate", "connections.rate_achieved"),
    ("connect_p50_us", "connections.latency.p50_us"),
    ("connect_p99_us", "connections.latency.p99_us"),
    ("connect_max_us", "connections.latency.max_us"),
    ("rss_per_stream_bytes", "server.rss_per_conn_bytes"),
    ("rss_per_stream_after_churn_bytes", "server.rss_per_conn_bytes_after_waves"),
    ("publish_rate", "publish.rate_achieved"),
    ("expected", "deliveries.expected"),
    ("received", "deliveries.received"),
    ("lost", "deliveries.lost"),
    ("duplicated", "deliveries.duplicated"),
    ("p50_us", "deliveries.latency.p50_us"),
    ("p90_us", "deliveries.latency.p90_us"),
    ("p99_us", "deliveries.latency.p99_us"),
    ("p999_us", "deliveries.latency.p999_us"),
    ("max_us", "deliveries.latency.max_us"),
    ("deliveries_per_server_cpu_sec", "server.deliveries_per_cpu_sec"),
    ("server_cpu_secs_per_million", "server.cpu_secs_per_million_deliveries"),
    ("tool_cpu_secs", "tool_cpu.total"),
    ("wave_secs_to_all", "waves.0.secs_to_all"),
    ("wave_ok", "waves.0.ok"),
    ("wave_failed", "waves.0.failed"),
    ("wave_connect_p50_us", "waves.0.latency.p50_us"),
    ("wave_connect_p99_us", "waves.0.latency.p99_us"),
    ("highest_sustainable_rate", "highest_sustainable_rate"),
]

REPEAT = re.compile(r"^(?P<base>.+)-r(?P<n>\d+)$")


def get(summary, path):
    node = summary
    if path == "tool_cpu.total":
        cpu = summary.get("tool_cpu") or {}
        if "user_secs" in cpu:
            return cpu["user_secs"] + cpu.get("sys_secs", 0)
        return None
    for key in path.split("."):
        if isinstance(node, list):
            node = node[int(key)] if key.isdigit() and int(key) < len(node) else None
        elif isinstance(node, dict):
            node = node.get(key)
        else:
            return None
        if node is None:
            return None
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def medians(directory):
    by_scenario = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        if ".part" in name or name in ("run", "medians"):
            continue
        m = REPEAT.match(name)
        base = m.group("base") if m else name
        with open(path) as f:
            by_scenario.setdefault(base, []).append(json.load(f))
    out = {}
    for base, runs in sorted(by_scenario.items()):
        entry = {"runs": len(runs)}
        for figure, path in FIGURES:
            values = [v for v in (get(r, path) for r in runs) if v is not None]
            if values:
                entry[figure] = {"median": statistics.median(values), "runs": values}
        out[base] = entry
    return out


def main(dirs):
    if not dirs:
        sys.exit(__doc__)
    for d in dirs:
        result = medians(d)
        with open(os.path.join(d, "medians.json"), "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"{d}: medians of {len(result)} scenarios -> {os.path.join(d, 'medians.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
