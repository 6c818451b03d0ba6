"""The run report: one self-contained HTML page (inline SVG plots, images as data URIs) beside the outputs.

It shows the per-stage summary (counts, skips, throughput, time), the cluster-size histogram, the prototype
alignment histogram with pairless and shared-pair prototypes apart (paper figures 4 and 5), and a contact sheet of
synthesized images with their captions; with ``--eval-data``, the evaluation harness's recall table.
"""

from __future__ import annotations

import base64
import html
import tarfile
from pathlib import Path

import numpy as np

COLORS = ("#3465a4", "#cc0000", "#4e9a06", "#f57900")


def svg_histogram(series: dict[str, np.ndarray], bins: int, title: str, xlabel: str, log_x: bool = False) -> str:
    """Overlaid histograms of ``series`` (name -> values) as an inline SVG string."""
    w, h, pad = 560, 260, 44
    values = [np.asarray(v, dtype=float) for v in series.values() if len(v)]
    if not values:
        return f"<p><b>{html.escape(title)}</b>: no data</p>"
    every = np.concatenate(values)
    if log_x:
        every = np.log10(np.maximum(every, 1))
    lo, hi = float(every.min()), float(every.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = {}
    for name, v in series.items():
        v = np.asarray(v, dtype=float)
        counts[name] = np.histogram(np.log10(np.maximum(v, 1)) if log_x else v, edges)[0]
    top = max(int(c.max()) for c in counts.values()) or 1
    bw = (w - 2 * pad) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="14">{html.escape(title)}</text>']  # fmt: skip
    for k, (name, c) in enumerate(counts.items()):
        color = COLORS[k % len(COLORS)]
        for i, n in enumerate(c):
            if n:
                bh = (h - 2 * pad) * n / top
                parts.append(f'<rect x="{pad + i * bw:.1f}" y="{h - pad - bh:.1f}" width="{bw:.1f}" '
                             f'height="{bh:.1f}" fill="{color}" fill-opacity="0.55"><title>{html.escape(name)}: '
                             f"{n}</title></rect>")  # fmt: skip
        parts.append(f'<rect x="{w - pad - 150}" y="{26 + 16 * k}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{w - pad - 135}" y="{35 + 16 * k}" font-size="11">{html.escape(name)} '
                     f"({int(c.sum())})</text>")  # fmt: skip
    fmt = (lambda x: f"{10**x:.0f}") if log_x else (lambda x: f"{x:.2f}")
    for x in np.linspace(lo, hi, 5):
        px = pad + (x - lo) / (hi - lo) * (w - 2 * pad)
        parts.append(f'<text x="{px:.1f}" y="{h - pad + 14}" text-anchor="middle" font-size="10">{fmt(x)}</text>')
    parts.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#555"/>')
    parts.append(f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>')
    parts.append(
        f'<text x="12" y="{h / 2}" font-size="11" transform="rotate(-90 12 {h / 2})">count (max {top})</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def contact_sheet(distilled: Path, limit: int = 48) -> str:
    """The first ``limit`` synthesized images of the distilled set's shards, with their captions, as HTML."""
    cells = []
    for tar_path in sorted((distilled / "shards").glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, sample in members.items():
            ext = "png" if "png" in sample else "jpg"
            if ext not in sample:
                continue
            uri = f"data:image/{'png' if ext == 'png' else 'jpeg'};base64,{base64.b64encode(sample[ext]).decode()}"
            caption = html.escape(sample.get("txt", b"").decode())
            cells.append(f'<figure><img src="{uri}" alt="{caption}" width="160" height="160">'
                         f"<figcaption><b>{key}</b> {caption}</figcaption></figure>")  # fmt: skip
            if len(cells) >= limit:
                return "\n".join(cells)
    return "\n".join(cells)


def _stage_rows(summary: dict) -> str:
    rows = []
    for name, s in summary.get("stages", {}).items():
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(s.get('status', ''))}</td>"
                    f"<td>{html.escape(s.get('what', ''))}</td><td>{s.get('seconds', 0):.1f}</td></tr>")  # fmt: skip
    return "\n".join(rows)


def _models(summary: dict) -> str:
    parts = []
    if "embed" in summary:
        m = summary["embed"]["model"]
        parts.append(f"CLIP <code>{html.escape(m['name'])}/{html.escape(m['pretrained'] or 'random init')}</code>")
    if "synthesize" in summary:
        parts.append(f"decoder <code>{html.escape(summary['synthesize']['model'])}</code>")
    return ("Models: " + ", ".join(parts) + ".") if parts else ""


def _evaluation(evaluation: dict | None) -> str:
    if not evaluation:
        return ""
    from rdistill.eval.report import table_html

    link = '<p>Curves and settings: <a href="eval/eval.html">eval/eval.html</a>.</p>'
    return f"<h2>Retrieval evaluation</h2>\n{table_html(evaluation)}\n{link}"


def write_report(out: Path, summary: dict, prototypes: Path, distilled: Path | None, images: int = 48,
                 evaluation: dict | None = None) -> Path:  # fmt: skip
    """Write ``out/report.html`` from the stage outputs (and ``evaluation``, an ``eval.json`` document, as the
    recall table); returns its path."""
    import pyarrow.parquet as pq

    from rdistill.io.outputs import atomic_write_text

    t = pq.read_table(prototypes / "prototypes.parquet").to_pydict()
    pairless = np.asarray(t["pairless"], bool)
    align = np.asarray(t["alignment"], float)
    sizes = {
        "image clusters": np.asarray(t["image_cluster_size"]),
        "text clusters": np.asarray(t["text_cluster_size"]),
    }
    plots = [
        svg_histogram(sizes, 30, "Cluster sizes (figure 4)", "pairs per cluster (log scale)", log_x=True),
        svg_histogram({"shared-pair prototypes": align[~pairless], "pairless prototypes": align[pairless]}, 30,
                      "Prototype alignment (figure 5)", "cosine(image prototype, text prototype)"),
    ]  # fmt: skip
    sheet = contact_sheet(distilled, images) if distilled is not None and (distilled / "shards").exists() else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rdistill report: {html.escape(str(out))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 2em; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ width: 160px; margin: 0; font-size: 11px; }} img {{ image-rendering: auto; border: 1px solid #ddd; }}
</style></head><body>
<h1>rdistill: PDS distilled set</h1>
<p>{len(align)} prototypes ({int(pairless.sum())} pairless), mean alignment {align.mean():.3f}.
Output: <code>{html.escape(str(out))}</code>. {_models(summary)}</p>
<h2>Stages</h2>
<table><tr><th>stage</th><th>status</th><th>result</th><th>seconds</th></tr>
{_stage_rows(summary)}
</table>
<h2>Clusters and prototypes</h2>
<div class="plots">{"".join(plots)}</div>
{_evaluation(evaluation)}
<h2>Synthesized images</h2>
<div class="sheet">{sheet or "<p>no images yet</p>"}</div>
</body></html>
"""
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
