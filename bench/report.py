#!/usr/bin/env python3
"""Medians per (scenario, broker) from bench/run.sh's JSON lines, ratios of Wharf to each peer,
a Markdown table on stdout, and PNG plots next to the results file.
Usage: report.py RESULTS.jsonl"""
import json, pathlib, statistics, sys
from collections import defaultdict

path = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip().startswith("{")]
groups = defaultdict(list)
catchup = []
sync = []
for r in rows:
    if r["scenario"] == "catchup":
        catchup.append(r)
    elif r["scenario"] == "sync":
        sync.append(r)
    else:
        groups[(r["scenario"], r["label"])].append(r)

def med(items, key):
    values = [i[key] for i in items if key in i]
    return statistics.median(values) if values else None

brokers = ["wharf-base", "wharf", "wharf5", "mosquitto", "rumqttd"]
load_metrics = [("msgs_per_sec", "msg/s", True), ("lost", "lost", False),
                ("lost_by_id", "acknowledged, not received (by identity)", False),
                ("duplicates", "duplicates", False), ("p50_us", "p50 µs", False),
                ("p99_us", "p99 µs", False), ("p999_us", "p99.9 µs", False),
                ("cpu_us_per_msg", "CPU µs/msg", False), ("rss_kib", "RSS KiB", False),
                ("catchup_msgs_per_sec", "returning session: msg/s from reconnect", True)]
scenarios = ["qos0", "qos1", "qos1x8to1", "qos1x8to8", "catchup1", "lat0", "lat1", "fanin", "fanout"]
titles = {"qos0": "QoS 0, 1 -> 1, flat out", "qos1": "QoS 1, 1 -> 1, flat out",
          "lat0": "QoS 0, 1 -> 1, 20k msg/s", "lat1": "QoS 1, 1 -> 1, 20k msg/s",
          "qos1x8to1": "QoS 1, 8 -> 1, flat out", "qos1x8to8": "QoS 1, 8 -> 8, flat out",
          "fanin": "QoS 1, 1000 -> 1, 20 msg/s each", "fanout": "QoS 0, 1 -> 1000, 20 msg/s",
          "catchup1": "QoS 1, 8 -> 1 persistent session offline, then back"}
out = []
for s in scenarios:
    present = [b for b in brokers if groups.get((s, b))]
    if not present:
        continue
    runs = {b: len(groups[(s, b)]) for b in present}
    out.append(f"\n### {titles[s]} (median of {min(runs.values())}-{max(runs.values())} runs)\n")
    out.append("| | " + " | ".join(present) + " | Wharf / " + " | Wharf / ".join(p for p in present if p != "wharf") + " |")
    out.append("|---" * (len(present) + 1 + len([p for p in present if p != "wharf"])) + "|")
    for key, name, _ in load_metrics:
        values = {b: med(groups[(s, b)], key) for b in present}
        if all(values[b] is None for b in present) or (
                key == "catchup_msgs_per_sec" and not any(values.values())):
            continue
        cells = ["–" if values[b] is None else f"{values[b]:,.0f}" if values[b] >= 10 else f"{values[b]:.2f}"
                 for b in present]
        ratios = []
        for p in present:
            if p == "wharf":
                continue
            w, v = values.get("wharf"), values[p]
            ratios.append(f"{w / v:.2f}x" if w is not None and v else "–")
        out.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")

idle = {b: groups.get(("idle", b)) for b in brokers if groups.get(("idle", b))}
if idle:
    out.append("\n### Idle connections\n")
    out.append("| | connections | failed | RSS per connection (bytes) |")
    out.append("|---|---|---|---|")
    for b, items in idle.items():
        out.append(f"| {b} | {med(items, 'connections'):,.0f} | {med(items, 'failed'):,.0f} | {med(items, 'bytes_per_connection'):,.0f} |")
for c in catchup:
    out.append("\n### Store queries against history (embedded store)\n")
    out.append("| history | session restore (ms, median) | catch-up (ms, median) | messages found |")
    out.append("|---|---|---|---|")
    for k in ("small", "large"):
        h = c[k]
        out.append(f"| {h['history']:,} | {h['restore_ms']:.2f} | {h['catchup_ms']:.2f} | {h['restored']} / {h['caught_up']} |")
    out.append(f"\nlarge / small: restore {c['large']['restore_ms'] / c['small']['restore_ms']:.2f}x, "
               f"catch-up {c['large']['catchup_ms'] / c['small']['catchup_ms']:.2f}x")
for c in sync:
    out.append("\n### Durable writes on the data directory's disk (p50 / p99 µs)\n")
    out.append(f"| {c['bytes'] // 1024} KiB overwrite + fdatasync | {c['bytes'] // 1024} KiB append + fdatasync | store commit of {c['batch']} messages |")
    out.append("|---|---|---|")
    out.append(f"| {c['overwrite_p50_us']:.0f} / {c['overwrite_p99_us']:.0f} | {c['append_p50_us']:.0f} / {c['append_p99_us']:.0f} | {c['commit_p50_us']:.0f} / {c['commit_p99_us']:.0f} |")
    out.append(f"\nQoS 1 ceiling from serial commits alone, window 100: 100 / (2 x {c['commit_p50_us']:.0f} µs) = "
               f"{100 / (2 * c['commit_p50_us'] * 1e-6):,.0f} msg/s (commit time of an idle machine; longer under load)")
print("\n".join(out))

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("\n(matplotlib not installed: no plots)")
    sys.exit(0)
colors = {"wharf-base": "#7f7f7f", "wharf": "#1f77b4", "wharf5": "#9467bd", "mosquitto": "#2ca02c", "rumqttd": "#ff7f0e"}
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, s in zip(axes, ["qos0", "qos1"]):
    present = [b for b in brokers if groups.get((s, b))]
    ax.bar(present, [med(groups[(s, b)], "msgs_per_sec") for b in present], color=[colors[b] for b in present])
    ax.set_title(titles[s]); ax.set_ylabel("delivered msg/s")
fig.tight_layout(); fig.savefig(path.with_suffix(".throughput.png"), dpi=110)
fig, axes = plt.subplots(1, 4, figsize=(16, 4))
for ax, s in zip(axes, ["lat0", "lat1", "fanin", "fanout"]):
    present = [b for b in brokers if groups.get((s, b))]
    x = range(len(present))
    for i, (key, label) in enumerate([("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")]):
        ax.bar([j + i * 0.27 for j in x], [med(groups[(s, b)], key) / 1000 for b in present], width=0.27, label=label)
    ax.set_xticks([j + 0.27 for j in x]); ax.set_xticklabels(present); ax.set_yscale("log")
    ax.set_title(titles[s], fontsize=9); ax.set_ylabel("latency, ms (log)"); ax.legend(fontsize=7)
fig.tight_layout(); fig.savefig(path.with_suffix(".latency.png"), dpi=110)
print(f"\nplots: {path.with_suffix('.throughput.png')}, {path.with_suffix('.latency.png')}")
