"""Medians over repetitions, the markdown table and the headline ratios of the peer benchmark."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from arch import PROBLEMS

LIBRARY_ORDER = ("repif", "captum", "dattri", "pydvl", "kronfluence")

#: Accuracy a method must reach (Pearson with the exact reference of its curvature) to enter
#: the headline time/memory comparison, as the benchmark's brief asks.
ACCURATE = 0.99

MEDIAN_KEYS = ("nonfinite_rows", "time_s", "peak_mem_bytes", "wall_s", "pearson", "spearman",
               "pearson_ggn", "spearman_ggn", "pearson_hessian", "spearman_hessian")


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (problem, library, method): medians over the successful repetitions."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["problem"], r["library"], r["method"]), []).append(r)
    rows = []
    for (problem, lib, method), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        row = {"problem": problem, "library": lib, "method": method, "reps": len(ok),
               "reference": rs[-1].get("reference")}
        if not ok:
            last = rs[-1]
            error = last["error"]
            if error.startswith("exit timeout"):
                error = (f"timed out at {last['wall_s']:.0f} s "
                         f"(peak RSS {last['peak_mem_bytes'] / 2**20:.0f} MB by then)")
            row.update(time_s=None, peak_mem_bytes=None, pearson=None, spearman=None,
                       error=error)
        else:
            for k in MEDIAN_KEYS:
                vals = [r[k] for r in ok if k in r]
                if vals:
                    row[k] = statistics.median(vals)
            row["peak_mem_bytes"] = int(row["peak_mem_bytes"])
            row["times_s"] = [round(r["time_s"], 3) for r in ok]
            if len(ok) < len(rs):
                row["failed_reps"] = len(rs) - len(ok)
        rows.append(row)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = ["| problem | library | method | reference | time (s) | peak RSS (MB) | Pearson | "
             "Spearman | Pearson vs GGN | Pearson vs Hessian |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['problem']} | {r['library']} | {r['method']} | {r.get('reference') or '—'} |"
        if r["time_s"] is None:
            why = r.get("error", "")[:110].replace("|", "/")
            lines.append(f"{head} — | — | — | — | — | error: {why} |")
            continue
        lines.append(
            f"{head} {r['time_s']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} | "
            f"{r['pearson']:.4f}{_nan_note(r)} | {r['spearman']:.4f} | "
            f"{_fmt(r.get('pearson_ggn'), '.4f')} | {_fmt(r.get('pearson_hessian'), '.4f')} |")
    return "\n".join(lines) + "\n"


def _nan_note(r: dict) -> str:
    n = r.get("nonfinite_rows")
    return f" ({n:.0f} NaN query rows left out)" if n else ""


def headline(rows: list[dict], threshold: float = ACCURATE) -> list[dict]:
    """Per problem: the fastest repif method and the fastest peer method with Pearson ≥
    threshold against their own exact reference, and repif's time and memory ratios."""
    out = []
    for problem in PROBLEMS:
        ok = [r for r in rows if r["problem"] == problem and r["time_s"] is not None
              and r["pearson"] >= threshold and not r.get("nonfinite_rows")]
        ours = [r for r in ok if r["library"] == "repif"]
        peers = [r for r in ok if r["library"] != "repif"]
        if not ours or not peers:
            out.append({"problem": problem, "repif": ours and min(ours, key=_t)["method"],
                        "peer": None, "note": "no peer method" if ours else "no repif method"})
            continue
        a, b = min(ours, key=_t), min(peers, key=_t)
        out.append({"problem": problem, "repif": a["method"], "repif_time_s": a["time_s"],
                    "repif_mem": a["peak_mem_bytes"], "peer": f"{b['library']} {b['method']}",
                    "peer_time_s": b["time_s"], "peer_mem": b["peak_mem_bytes"],
                    "time_ratio": a["time_s"] / b["time_s"],
                    "mem_ratio": a["peak_mem_bytes"] / b["peak_mem_bytes"]})
    return out


def _t(r: dict) -> float:
    return r["time_s"]


def headline_text(items: list[dict], threshold: float = ACCURATE) -> str:
    lines = [f"At Pearson ≥ {threshold} against the exact reference of each method's curvature:"]
    for h in items:
        if h.get("peer") is None:
            lines.append(f"- {h['problem']}: {h['note']} reaches it.")
            continue
        lines.append(
            f"- {h['problem']}: repif {h['repif']} {h['repif_time_s']:.2f} s, "
            f"{h['repif_mem'] / 2**20:.0f} MB; fastest peer {h['peer']} {h['peer_time_s']:.2f} s, "
            f"{h['peer_mem'] / 2**20:.0f} MB → time ×{h['time_ratio']:.2f}, "
            f"memory ×{h['mem_ratio']:.2f}.")
    return "\n".join(lines) + "\n"


def write(runs: list[dict], merge: bool, results: Path) -> None:
    """peers.json (rows + headline) and peers.md; ``merge`` keeps rows not in ``runs``."""
    rows = summarise(runs)
    path = results / "peers.json"
    if merge and path.exists():
        new = {(r["problem"], r["library"], r["method"]) for r in rows}
        old = json.loads(path.read_text())
        old = old["rows"] if isinstance(old, dict) else old
        rows = [r for r in old if (r["problem"], r["library"], r["method"]) not in new] + rows
    order = {p: i for i, p in enumerate(PROBLEMS)}
    lib_order = {lib: i for i, lib in enumerate(LIBRARY_ORDER)}
    rows.sort(key=lambda r: (order.get(r["problem"], 9), lib_order.get(r["library"], 9),
                             r["method"]))
    items = headline(rows)
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    (results / "peers-headline.json").write_text(json.dumps(items, indent=1) + "\n")
    text = table(rows) + "\n" + headline_text(items)
    (results / "peers.md").write_text(text)
    print(text)
