#!/usr/bin/env python3
"""Medians of repeated runs, from sse-bench summaries (no dependencies).

    python3 bench/medians.py RESULTS_DIR [RESULTS_DIR ...]
    python3 bench/medians.py --table GATEWAY_DIR [NCHAN_DIR [PUSHPIN_DIR]]

A run made with REPEAT=n writes `<scenario>-r1.json` ... `<scenario>-rn.json`; this takes, figure by
figure, the median over the repeats of each scenario and writes RESULTS_DIR/medians.json:

    {"<scenario>": {"runs": n, "<figure>": {"median": m, "runs": [v1, ..., vn]}, ...}, ...}

A scenario run once counts as one repeat. Per-process parts (`*.partN.json`) are skipped: the
merged summary beside them is the run. `plot.py` and the tables in docs/benchmarks.md read these
medians. With `--table` it prints the side-by-side table of docs/benchmarks.md (issue 5's
targets, each figure a median of the repeats) instead.
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


def kib(b):
    return f"{b / 1024:.2f} KiB"


def ms(us):
    if us < 10_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1000:.0f} ms" if us < 1_000_000 else f"{us / 1e6:.1f} s"


def per_s(x):
    return f"{x / 1000:.0f}k/s" if x >= 10_000 else f"{x:,.0f}/s" if x >= 100 else f"{x:.1f}/s"


# (figure, target text, scenario, cell(medians of the scenario) -> text, met(gateway, nchan) -> bool or None)
def rows():
    def f(m, k):
        return (m.get(k) or {}).get("median")

    def streams(m):
        return f"{f(m, 'streams_ok'):,.0f} of {f(m, 'streams_ok') + f(m, 'streams_failed'):,.0f}"

    def short(m):
        # Figures of a run where some streams never connected are about the ones that did.
        return f" ({streams(m)} streams)" if f(m, "streams_failed") else ""

    return [
        ("idle RSS per stream, 10k streams at 1,000/s, pings on", "≤ 4.4 KiB", "idle-10000",
         lambda m: kib(f(m, "rss_per_stream_bytes")), lambda g, n: f(g, "rss_per_stream_bytes") <= 4.4 * 1024),
        ("... after every stream reconnected once (churn)", "", "idle-10000",
         lambda m: kib(f(m, "rss_per_stream_after_churn_bytes")), None),
        ("idle RSS per stream, 19.5k streams on one instance", "≤ 4.4 KiB", "idle-19500",
         lambda m: kib(f(m, "rss_per_stream_bytes")), lambda g, n: f(g, "rss_per_stream_bytes") <= 4.4 * 1024),
        ("streams held by one instance (19.5k requested)", "19.5k", "idle-19500",
         streams, lambda g, n: f(g, "streams_ok") >= 19_500),
        ("streams on one box: six instances, one Redis, six tool processes", "100k", "idle-multi-100000",
         lambda m: f"{streams(m)}, {kib(f(m, 'rss_per_stream_bytes'))} each",
         lambda g, n: f(g, "streams_ok") >= 99_996),
        ("new streams per second sustained (19.5k at 5,000/s requested)", "≥ 5k/s", "idle-19500",
         lambda m: f"{per_s(f(m, 'connect_rate'))}, {f(m, 'streams_failed'):,.0f} failed",
         lambda g, n: f(g, "connect_rate") >= 4_950 and f(g, "streams_failed") == 0),
        ("connect p50 / p99 at 1,000/s (TCP connect → first body byte)", "p99 ≤ 2 ms", "idle-10000",
         lambda m: f"{ms(f(m, 'connect_p50_us'))} / {ms(f(m, 'connect_p99_us'))}",
         lambda g, n: f(g, "connect_p99_us") <= 2_000),
        ("unicast 5k msg/s to 2k users: p50 / p99, lost", "p99 ≤ 1 ms, 0 lost", "unicast-5000",
         lambda m: f"{ms(f(m, 'p50_us'))} / {ms(f(m, 'p99_us'))}, {f(m, 'lost'):,.0f} lost{short(m)}",
         lambda g, n: f(g, "p99_us") <= 1_000 and f(g, "lost") == 0),
        ("highest sustainable unicast rate (no loss, p99 ≤ 50 ms)", "≥ 50k/s", "unicast-search",
         lambda m: per_s(f(m, "highest_sustainable_rate")) if f(m, "highest_sustainable_rate") else "none of those tried",
         lambda g, n: f(g, "highest_sustainable_rate") >= 50_000),
        ("broadcast 10 msg/s to 5k streams: p50 / p99", "p99 ≤ 20 ms", "broadcast-10",
         lambda m: f"{ms(f(m, 'p50_us'))} / {ms(f(m, 'p99_us'))}{short(m)}",
         lambda g, n: f(g, "p99_us") <= 20_000),
        ("... deliveries per server CPU-second", "≥ 3× Nchan", "broadcast-10",
         lambda m: per_s(f(m, "deliveries_per_server_cpu_sec")),
         lambda g, n: n and f(g, "deliveries_per_server_cpu_sec") >= 3 * f(n, "deliveries_per_server_cpu_sec")),
        ("broadcast 20 msg/s to 5k: publisher rate, p99", "20/s, p99 ≤ 50 ms", "broadcast-20",
         lambda m: f"{per_s(f(m, 'publish_rate'))}, {ms(f(m, 'p99_us'))}{short(m)}",
         lambda g, n: f(g, "publish_rate") >= 19.5 and f(g, "p99_us") <= 50_000),
        ("... deliveries per server CPU-second", "≥ 3× Nchan", "broadcast-20",
         lambda m: per_s(f(m, "deliveries_per_server_cpu_sec")),
         lambda g, n: n and f(g, "deliveries_per_server_cpu_sec") >= 3 * f(n, "deliveries_per_server_cpu_sec")),
        ("broadcast burst of 200 to 5k: publisher rate, p99", "", "broadcast-burst",
         lambda m: f"{per_s(f(m, 'publish_rate'))}, {ms(f(m, 'p99_us'))}", None),
        ("storm: 19.5k streams reconnect at once with Last-Event-ID, broadcasts at 20/s: all back in, failed", "",
         "storm-19500",
         lambda m: (f"{f(m, 'wave_secs_to_all'):.1f} s, " if f(m, "wave_ok") else "none back, ")
         + f"{f(m, 'wave_failed'):,.0f} failed",
         None),
        ("... events lost across the wave", "0", "storm-19500",
         lambda m: f"{f(m, 'lost'):,.0f} of {f(m, 'expected'):,.0f}", lambda g, n: f(g, "lost") == 0),
    ]


def table(dirs):
    names = ["sse-gateway", "Nchan", "Pushpin"][: len(dirs)]
    data = [medians(d) for d in dirs]
    print("| figure | target | " + " | ".join(names) + " | met? |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for figure, target, scenario, cell, met in rows():
        cells = []
        for m in data:
            try:
                cells.append(cell(m[scenario]) if scenario in m else "not run")
            except (TypeError, KeyError):
                cells.append("n/a")
        verdict = ""
        if met is not None and scenario in data[0]:
            nchan = data[1].get(scenario) if len(data) > 1 else None
            try:
                verdict = "yes" if met(data[0][scenario], nchan) else "**no**"
            except (TypeError, KeyError):
                verdict = "n/a"
        print(f"| {figure} | {target} | " + " | ".join(cells) + f" | {verdict} |")


def main(dirs):
    if dirs and dirs[0] == "--table":
        table(dirs[1:])
        return
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
