"""``index.html`` of a report: one self-contained page (figures embedded as base64 PNG, tables as
HTML, links to the files in ``figures/`` and ``tables/``), readable offline."""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

from ernie_lab.plots import token_label
from ernie_lab.report.columns import describe_columns
from ernie_lab.report.spec import KINDS

# rows of a table shown in the page; the CSV next to it has all of them
MAX_ROWS = 20
FAMILIES = {
    "routing": "Routing statistics",
    "patching": "Activation patching",
    "ablation": "Expert ablation",
    "experts": "Expert-level analyses",
}

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-top: 1.6em; }
.explain { color: #444; font-style: italic; }
.meta td { padding: 0.1em 1em 0.1em 0; vertical-align: top; }
table.data { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 0.15em 0.5em; text-align: right; }
table.data th { background: #f3f3f3; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .caption { font-size: 0.85em; color: #555; }
code { background: #f5f5f5; padding: 0 0.2em; }
.note { background: #f7f7ff; border-left: 3px solid #88a; padding: 0.3em 0.8em; margin: 0.5em 0; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<table class="meta">
<tr><td>model</td><td><code>{{ spec.model }}</code>
  {%- if spec.dtype %} ({{ spec.dtype }}){% endif %}, device {{ spec.device }}</td></tr>
<tr><td>checkpoint</td><td>{% for f in manifest.checkpoint.files %}
  <code>{{ f.name }}</code> sha256 <code>{{ f.sha256 }}</code><br>{% else %}not hashed{% endfor %}</td></tr>
<tr><td>mode</td><td>{{ "quick" if manifest.quick else "full" }}; seed {{ spec.seed }};
  batch size {{ spec.batch_size }}; {{ manifest.torch_threads }} CPU thread(s)</td></tr>
<tr><td>versions</td><td>{% for k, v in manifest.versions.items() %}
  {{- k }} {{ v }}{{ ", " if not loop.last }}{% endfor %}</td></tr>
<tr><td>created</td><td>{{ manifest.timestamp }}</td></tr>
<tr><td>files</td><td><a href="manifest.json">manifest.json</a> (resolved spec, versions, hashes),
  <code>figures/</code>, <code>tables/</code></td></tr>
</table>
<h2>Contents</h2>
<ul>
{% for family, sections in groups %}<li>{{ family }}<ul>
{% for s in sections %}<li><a href="#{{ s.id }}">{{ s.title }}</a>{% if s.id != s.kind %} ({{ s.id }}){% endif %}</li>
{% endfor %}</ul></li>
{% endfor %}</ul>
<h2>Datasets</h2>
<ul>
{% for d in datasets %}<li><code>{{ d.name }}</code>: {{ d.summary }}</li>
{% endfor %}</ul>
{% for family, sections in groups %}
<h2>{{ family }}</h2>
{% for s in sections %}
<h3 id="{{ s.id }}">{{ s.title }}{% if s.id != s.kind %} <small>({{ s.id }})</small>{% endif %}</h3>
<p class="explain">{{ s.explain }}</p>
<p class="caption">options: <code>{{ s.options_text }}</code></p>
{% for n in s.notes %}<div class="note">{{ n }}</div>
{% endfor %}
{% for f in s.figures %}<figure><img alt="{{ f.file }}" src="data:image/png;base64,{{ f.data }}">
<figcaption><a href="{{ f.file }}">{{ f.file }}</a>{% if f.caption %}: {{ f.caption }}{% endif %}</figcaption></figure>
{% endfor %}
{% for t in s.tables %}<p class="caption"><a href="{{ t.file }}">{{ t.file }}</a> ({{ t.n_rows }} rows
  {%- if t.n_rows > max_rows %}, first {{ max_rows }} shown{% endif %})
  {%- if t.caption %}: {{ t.caption }}{% endif %}</p>
{{ t.html }}
<p class="caption">columns: {% for name, meaning in t.columns %}<code>{{ name }}</code> {{ meaning
  }}{{ "; " if not loop.last }}{% endfor %}</p>
{% endfor %}
{% endfor %}
{% endfor %}
</body>
</html>
"""


def _float(x: float) -> str:
    return f"{x:.4g}"


def table_html(df: pd.DataFrame) -> str:
    """The first :data:`MAX_ROWS` rows as an escaped HTML table with compact floats; token texts show
    their spaces (``␣``), which HTML would otherwise collapse."""
    shown = df.head(MAX_ROWS).copy()
    if "token" in shown:
        shown["token"] = shown["token"].map(lambda t: token_label(t) if isinstance(t, str) else t)
    return shown.to_html(index=False, classes="data", border=0, float_format=_float, na_rep="nan")


def render(title: str, spec: dict, manifest: dict, datasets: list[dict], sections: list[dict], root: Path) -> str:
    """The page. ``sections``: dicts with id, kind, options_text, notes, figures (file, caption) and
    tables (file, caption, frame); figure files are read from ``root`` and embedded."""
    prepared = []
    for s in sections:
        figures = [
            {
                "file": f["file"],
                "caption": f["caption"],
                "data": base64.b64encode((root / f["file"]).read_bytes()).decode(),
            }
            for f in s["figures"]
        ]
        tables = [
            {
                "file": t["file"],
                "caption": t["caption"],
                "n_rows": len(t["frame"]),
                "html": table_html(t["frame"]),
                "columns": describe_columns(t["frame"].columns),
            }
            for t in s["tables"]
        ]
        kind = KINDS[s["kind"]]
        prepared.append(s | {"title": kind.title, "explain": kind.explain, "family": kind.family} | {
            "figures": figures, "tables": tables,
        })  # fmt: skip
    groups = []
    for family, heading in FAMILIES.items():
        members = [s for s in prepared if s["family"] == family]
        if members:
            groups.append((heading, members))
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    # tables are HTML built by pandas from escaped values: mark them safe, escape everything else
    for s in prepared:
        for t in s["tables"]:
            t["html"] = Markup(t["html"])
    return env.from_string(TEMPLATE).render(
        title=title, spec=spec, manifest=manifest, datasets=datasets, groups=groups, max_rows=MAX_ROWS
    )
