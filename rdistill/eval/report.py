"""The recall table as text (the CLI), as an HTML fragment (the job's report) and as ``eval.html`` (with the
recall-vs-pass curves as inline SVG)."""

from __future__ import annotations

import html
from pathlib import Path

from rdistill.algo.recall import KEYS

COLS = KEYS[:6]
COLORS = ("#3465a4", "#cc0000", "#4e9a06", "#f57900", "#75507b", "#c17d11", "#555753", "#06989a")


def _rows(summary: dict) -> tuple[list[str], list[str], dict]:
    sets, students, cells = [], [], {}
    for r in summary["results"]:
        if r["set"] not in sets:
            sets.append(r["set"])
        if r["student"] not in students:
            students.append(r["student"])
        cells[(r["set"], r["student"])] = r
    return sets, students, cells


def _heading(summary: dict) -> str:
    how = "selected on val" if summary["select"] == "val" else "SELECTED ON TEST"
    return (
        f"{summary['protocol']} protocol, text {summary['text_encoder']}, {summary['settings']['runs']} runs, "
        f"epochs {how}"
    )


def text_table(summary: dict) -> str:
    """The table as plain text: one block per student, one line per set, ``mean±std`` per column."""
    sets, students, cells = _rows(summary)
    lines = [_heading(summary)]
    if summary["select"] == "test":
        lines.append(f"NOTE: {summary['select_note']}")
    width = max(len(s) for s in sets) + 2
    for student in students:
        lines.append(f"student {student}")
        lines.append(" " * width + " ".join(f"{c:>11}" for c in COLS) + f" {'r_mean':>7}  epochs")
        for s in sets:
            r = cells.get((s, student))
            if r is None:
                continue
            vals = " ".join(f"{r['test'][c]:5.1f}±{r['test_std'][c]:4.1f}" for c in COLS)
            lines.append(f"{s:<{width}}{vals} {r['test']['r_mean']:7.2f}  {r['epochs']}")
    return "\n".join(lines)


def table_html(summary: dict) -> str:
    """The table as an HTML fragment: students side by side, sets as rows, mean ± std of the test recalls."""
    sets, students, cells = _rows(summary)
    head1 = "".join(f'<th colspan="{len(COLS) + 1}">{html.escape(st)}</th>' for st in students)
    head2 = "".join(("".join(f"<th>{c}</th>" for c in COLS) + "<th>r_mean</th>") for _ in students)
    body = []
    for s in sets:
        tds = []
        for st in students:
            r = cells.get((s, st))
            if r is None:
                tds.append(f'<td colspan="{len(COLS) + 1}"></td>')
                continue
            tds += [f"<td>{r['test'][c]:.1f} ± {r['test_std'][c]:.1f}</td>" for c in COLS]
            tds.append(f"<td>{r['test']['r_mean']:.2f}</td>")
        kind = next((cells[(s, st)]["kind"] for st in students if (s, st) in cells), "")
        label = html.escape(s) + (f" <small>({html.escape(kind)})</small>" if kind != "distilled" else "")
        body.append(f"<tr><td>{label}</td>{''.join(tds)}</tr>")
    note = f"<p><b>Note:</b> {html.escape(summary['select_note'])}</p>" if summary["select"] == "test" else ""
    return (
        f"<p>{html.escape(_heading(summary))}; test split of {html.escape(summary['eval_data']['source'])} "
        f"({summary['eval_data']['splits']['test']['images']} images, "
        f"{summary['eval_data']['splits']['test']['captions']} captions), recall in percent, mean ± std over "
        f'runs.</p>{note}<table><tr><th rowspan="2">set</th>{head1}</tr><tr>{head2}</tr>'
        f"{''.join(body)}</table>"
    )


def svg_curves(series: dict[str, list[tuple[int, float]]], title: str) -> str:
    """Lines of ``(epoch, value)`` points, one per name, as an inline SVG string."""
    w, h, pad = 560, 260, 44
    pts = [p for v in series.values() for p in v]
    if not pts:
        return f"<p><b>{html.escape(title)}</b>: no data</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y1 = max(max(p[1] for p in pts), 1e-9)
    x1 = x1 if x1 > x0 else x0 + 1

    def xy(e, v):
        return pad + (e - x0) / (x1 - x0) * (w - 2 * pad), h - pad - v / y1 * (h - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#555"/>',
        f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle" font-size="11">pass</text>',
        f'<text x="{pad - 4}" y="{pad}" text-anchor="end" font-size="10">{y1:.1f}</text>',
        f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end" font-size="10">0</text>',
    ]
    for k, (name, points) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        dash = ' stroke-dasharray="5,3"' if name.endswith("test") else ""
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(e, v) for e, v in points))
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"{dash}>'
            f"<title>{html.escape(name)}</title></polyline>"
        )
        parts.append(
            f'<text x="{w - pad - 200}" y="{30 + 13 * k}" font-size="10" fill="{color}">{html.escape(name)}</text>'
        )
    for e in sorted({p[0] for p in pts}):
        x, _ = xy(e, 0)
        parts.append(f'<text x="{x:.1f}" y="{h - pad + 14}" text-anchor="middle" font-size="10">{e}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def curves_html(summary: dict) -> str:
    """One plot per student: mean r_mean against the pass, val solid and test dashed, one colour per set."""
    sets, students, cells = _rows(summary)
    plots = []
    for st in students:
        series = {}
        for s in sets:
            r = cells.get((s, st))
            if r is None:
                continue
            for split in ("val", "test"):
                pts = [(p["epoch"], p[split]["r_mean"]) for p in r["curve"] if split in p]
                if pts:
                    series[f"{s} {split}"] = pts
        plots.append(svg_curves(series, f"{st}: r_mean by pass (val solid, test dashed)"))
    return "".join(plots)


def write_eval_html(path: str | Path, summary: dict) -> Path:
    from rdistill.io.outputs import atomic_write_text

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rdistill evaluation: {html.escape(summary["output"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child {{ text-align: left; }} .plots {{ display: flex; flex-wrap: wrap; gap: 2em; }}
</style></head><body>
<h1>rdistill: retrieval evaluation</h1>
{table_html(summary)}
<h2>Recall by pass</h2>
<div class="plots">{curves_html(summary)}</div>
<p>Students {html.escape(", ".join(summary["students"]))} (weights: {html.escape(summary["image_weights"])},
image backbone {"fine-tuned" if summary["image_trainable"] else "frozen (text head only)"}), executor
{html.escape(summary["executor"])} on {html.escape(summary["device"])}.</p>
</body></html>
"""
    path = Path(path)
    atomic_write_text(path, page)
    return path
