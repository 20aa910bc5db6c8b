"""Render :class:`ReportData` as one self-contained HTML page (inline CSS, JS, SVG and images).

Why it is built this way:

* **One file, no network.** Styles, script, charts and thumbnails are all inline, so the report
  opens from ``file://`` on an air-gapped workstation, can be mailed or archived with the run, and
  loads nothing from a CDN (which would also leak that someone opened it).
* **The table's data is embedded once**, as column-major JSON in a ``<script type="application/
  json">`` block, and the script renders one page of rows at a time: 100,000 images × 14 findings
  stay a few megabytes of JSON and a few hundred DOM nodes, so sorting, filtering and paging stay
  responsive. Sorting keeps an index array (numbers compared as ``Float64Array`` values, empty
  cells last in either direction; ties in input order, so sorting is stable).
* **Everything else is static markup** drawn here (histograms, counts, gallery), so the summary
  reads even with scripts disabled, and the file is a pure function of its inputs: the same
  folder renders byte-identical HTML.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from radflash.report.data import FindingSummary, GalleryTile, ReportData
from radflash.report.svg import decision_svg, histogram_svg

PAGE_SIZES = (10, 25, 50, 100, 250, 1000)
DEFAULT_PAGE_SIZE = 50


def render(data: ReportData, *, mode: str, version: str) -> str:
    """The whole page as a string (UTF-8 when written)."""
    body = "".join([
        _header(data),
        _summary(data),
        _findings(data),
        _images(data),
        _gallery(data),
        _footer(data, mode, version),
    ])
    payload = {
        "columns": [{"label": c.label, "kind": c.kind, "digits": _digits(c.label) if c.kind == "num" else None}
                    for c in data.columns],
        "rows": data.rows,
        "data": data.table,
        "pageSizes": list(PAGE_SIZES),
        "pageSize": DEFAULT_PAGE_SIZE,
    }
    return (TEMPLATE.replace("@@TITLE@@", escape(data.title))
            .replace("@@CSS@@", CSS)
            .replace("@@KIND@@", data.kind)
            .replace("@@MODE@@", escape(mode))
            .replace("@@BODY@@", body)
            .replace("@@DATA@@", script_json(payload))
            .replace("@@JS@@", JS))


def script_json(obj: Any) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` escaped, so no text can close the block."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _digits(label: str) -> int:
    return 2 if label.endswith("area %") else 3


def _header(d: ReportData) -> str:
    parts = [f'<header><h1>{escape(d.title)}</h1>']
    if d.notice:
        parts.append(f'<p class="notice">{escape(d.notice)}</p>')
    for w in d.warnings:
        parts.append(f'<p class="warning">{escape(w)}</p>')
    parts.append('<nav><a href="#summary">Summary</a><a href="#findings">'
                 f'{"Findings" if d.kind == "score" else "Prompts"}</a><a href="#images">Images</a>'
                 '<a href="#gallery">Gallery</a></nav></header>')
    return "".join(parts)


def _summary(d: ReportData) -> str:
    counts = "".join(f'<div class="count" data-count-of="{escape(k)}"><b>{v:,}</b><span>{escape(k)}</span></div>'
                     for k, v in d.counts)
    facts = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in d.facts)
    out = [f'<section id="summary"><h2>Summary</h2><div class="counts">{counts}</div>'
           f'<table class="facts">{facts}</table>']
    if d.reasons:
        rows = "".join(f'<tr class="{escape(g.status)}"><td>{escape(g.status)}</td><td>{escape(g.reason)}</td>'
                       f'<td class="num">{g.count:,}</td><td class="path">{escape(g.example)}</td></tr>'
                       for g in d.reasons)
        out.append('<h3>Skipped and failed files, by reason</h3><table class="reasons" id="reasons"><thead><tr>'
                   '<th>status</th><th>reason (numbers as #)</th><th>files</th><th>e.g.</th></tr></thead>'
                   f"<tbody>{rows}</tbody></table>")
    else:
        out.append('<p class="muted">No file was skipped or failed.</p>')
    out.append("</section>")
    return "".join(out)


def _findings(d: ReportData) -> str:
    what = "finding" if d.kind == "score" else "prompt"
    cards = "".join(_finding_card(f) for f in d.findings)
    value = escape(d.findings[0].value_label) if d.findings else ""
    line = ", the threshold as a dashed line" if any(f.threshold is not None for f in d.findings) else ""
    return (f'<section id="findings"><h2>{"Findings" if d.kind == "score" else "Prompts"}</h2>'
            f'<p class="muted">Per {what}: histogram of the {value} over all images{line}.</p>'
            f'<div class="cards">{cards}</div></section>')


def _finding_card(f: FindingSummary) -> str:
    parts = [f'<div class="card" data-finding="{escape(f.name)}"><h3>{escape(f.name)}</h3>']
    if f.prompt != f.name:
        parts.append(f'<p class="prompt">“{escape(f.prompt)}”</p>')
    parts.append(histogram_svg(f.values, threshold=f.threshold, label=f"{f.name} {f.value_label}"))
    parts.append(f'<p class="muted">{escape(f.threshold_note)}</p>')
    if f.positive is not None:
        parts.append(f'<p class="decided">above threshold: <b data-positive="{f.positive}">{f.positive:,}</b> '
                     f'of {f.positive + (f.negative or 0) + f.undecided:,}</p>')
        parts.append(decision_svg(f.positive, f.negative or 0, f.undecided))
    for k, v in f.stats:
        parts.append(f'<p class="stat">{escape(k)}: {escape(v)}</p>')
    parts.append("</div>")
    return "".join(parts)


def _images(d: ReportData) -> str:
    options = "".join(f'<option value="{i}">{escape(c.label)}</option>' for i, c in enumerate(d.columns)
                      if c.kind == "num")
    sizes = "".join(f'<option value="{n}"{" selected" if n == DEFAULT_PAGE_SIZE else ""}>{n}</option>'
                    for n in PAGE_SIZES)
    heads = "".join(f'<th data-col="{i}" class="{c.kind}" tabindex="0" role="button" aria-sort="none" '
                    f'title="sort by {escape(c.label)}">{escape(c.label)}</th>' for i, c in enumerate(d.columns))
    note = f'<p class="muted" id="table-note">{escape(d.table_note)}</p>' if d.table_note else ""
    return (
        '<section id="images"><h2>Images</h2>' + note +
        '<div class="controls">'
        '<label>name contains <input type="search" id="filter-text" placeholder="text"></label>'
        f'<label>and <select id="filter-col"><option value="">(no value filter)</option>{options}</select></label>'
        '<label>≥ <input type="number" id="filter-min" step="0.01" placeholder="0.5"></label>'
        f'<label>rows per page <select id="page-size">{sizes}</select></label>'
        '<span id="row-count" aria-live="polite"></span></div>'
        '<div class="table-wrap"><table id="image-table"><thead><tr>' + heads + '</tr></thead>'
        '<tbody id="image-rows"><tr><td>the table needs JavaScript</td></tr></tbody></table></div>'
        '<div class="pager"><button id="first" type="button">« first</button><button id="prev" type="button">‹ prev'
        '</button><span id="page-info"></span><button id="next" type="button">next ›</button>'
        '<button id="last" type="button">last »</button></div></section>'
    )


def _gallery(d: ReportData) -> str:
    out = ['<section id="gallery"><h2>Gallery</h2>']
    if d.gallery_note:
        out.append(f'<p class="muted" id="gallery-note">{escape(d.gallery_note)}</p>')
    out.append('<div id="gallery-rows">')
    for name, tiles in d.gallery or []:
        out.append(f'<div class="gallery-row" data-finding="{escape(name)}"><h3>{escape(name)}</h3><div class="tiles">')
        out.extend(_tile(t) for t in tiles)
        if not tiles:
            out.append('<p class="muted">no image</p>')
        out.append("</div></div>")
    out.append("</div></section>")
    return "".join(out)


def _tile(t: GalleryTile) -> str:
    point = ""
    if t.point is not None:
        r = max(3.0, min(t.width, t.height) / 40)
        point = (f'<svg class="point" viewBox="0 0 {t.width} {t.height}" aria-hidden="true">'
                 f'<circle cx="{t.point[0]:.1f}" cy="{t.point[1]:.1f}" r="{r + 1.5:.1f}" fill="none" stroke="#000" '
                 f'stroke-width="2"/><circle cx="{t.point[0]:.1f}" cy="{t.point[1]:.1f}" r="{r:.1f}" fill="none" '
                 f'stroke="#fff" stroke-width="1.5"/></svg>')
    return (f'<figure class="tile"><div class="frame" style="aspect-ratio:{t.width}/{t.height}">'
            f'<img src="{t.image}" width="{t.width}" height="{t.height}" alt="{escape(t.label)}">{point}</div>'
            f'<figcaption><span class="name" title="{escape(t.label)}"><bdi dir="ltr">{escape(t.label)}</bdi></span>'
            f'<span class="score">{escape(t.caption)}</span></figcaption></figure>')


def _footer(d: ReportData, mode: str, version: str) -> str:
    privacy = ("This file contains thumbnails of patients' radiographs: share it as you would the images. "
               if d.gallery else "")
    phi = ("It includes patient names and IDs (--include-phi). " if d.include_phi
           else "It contains no patient names or IDs. ")
    return (f'<footer><p>radflash {escape(version)} · report mode {escape(mode)} · self-contained: it loads '
            f'nothing from the network. {escape(phi + privacy)}</p></footer>')


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>@@TITLE@@</title>
<style>@@CSS@@</style>
</head>
<body data-kind="@@KIND@@" data-mode="@@MODE@@">
@@BODY@@
<script type="application/json" id="report-data">@@DATA@@</script>
<script>@@JS@@</script>
</body>
</html>
"""

CSS = """
:root{--fg:#1d232b;--muted:#5f6b7a;--line:#d9dee5;--bg:#fff;--soft:#f4f6f9;--accent:#3b6fb6}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1400px;padding:0 20px 40px;color:var(--fg);background:var(--bg);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{padding:12px 0 6px;border-bottom:1px solid var(--line)}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}h3{font-size:14px;margin:0 0 6px}
nav a{margin-right:14px;color:var(--accent);text-decoration:none}
.notice{margin:4px 0;padding:6px 10px;background:#fff4e5;border-left:4px solid #f0a030}
.warning{margin:4px 0;padding:6px 10px;background:#fdecea;border-left:4px solid #c62828}
.muted{color:var(--muted)}
.counts{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:12px}
.count{background:var(--soft);border-radius:6px;padding:8px 14px;min-width:110px}
.count b{display:block;font-size:22px}.count span{color:var(--muted)}
table{border-collapse:collapse}
.facts th{text-align:left;padding:2px 14px 2px 0;color:var(--muted);font-weight:500;vertical-align:top}
.facts{margin-bottom:16px}.facts td{word-break:break-all}
.reasons td,.reasons th{border-bottom:1px solid var(--line);padding:4px 10px 4px 0;text-align:left}
.reasons tr.failed td:first-child{color:#c62828}.reasons .path{color:var(--muted);word-break:break-all}
.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:6px;padding:10px}
.card p{margin:4px 0}.prompt{color:var(--muted);font-style:italic}
svg.chart{width:100%;height:auto;display:block;font-size:9px;fill:var(--muted)}
svg.chart text{fill:var(--muted)}
.controls{display:flex;gap:14px;flex-wrap:wrap;align-items:center;margin-bottom:8px}
.controls input,.controls select{font:inherit;padding:3px 6px}
#row-count{color:var(--muted)}
.table-wrap{overflow:auto;max-height:75vh;border:1px solid var(--line);border-radius:6px}
#image-table{width:100%;font-variant-numeric:tabular-nums}
#image-table th{position:sticky;top:0;background:var(--soft);cursor:pointer;user-select:none;padding:6px 8px;
  text-align:left;white-space:nowrap;font-weight:600}
#image-table th.num{text-align:right}
#image-table th[aria-sort=ascending]::after{content:" ▲"}#image-table th[aria-sort=descending]::after{content:" ▼"}
#image-table td{padding:3px 8px;border-top:1px solid var(--line);white-space:nowrap}
#image-table td.num{text-align:right}
#image-table td.text{max-width:420px;overflow:hidden;text-overflow:ellipsis}
.pager{display:flex;gap:8px;align-items:center;margin-top:8px}
.pager button{font:inherit;padding:3px 10px}
#gallery-rows{display:flex;flex-wrap:wrap;gap:10px 28px}
.gallery-row{margin-bottom:12px}
.tiles{display:flex;gap:8px;flex-wrap:wrap}
.tile{margin:0;width:140px}
.frame{position:relative;width:140px;background:#000;border-radius:4px;overflow:hidden}
.frame img{display:block;width:100%;height:100%}
.frame svg.point{position:absolute;inset:0;width:100%;height:100%}
figcaption{font-size:12px;display:flex;flex-direction:column}
figcaption .name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap;direction:rtl;text-align:left}
figcaption .score{color:var(--muted)}
footer{margin-top:36px;padding-top:10px;border-top:1px solid var(--line);color:var(--muted);font-size:12px}
"""

# The table: filter → sort → page, on an index array; only the visible page becomes DOM rows.
JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var cols = D.columns, N = D.rows, C = cols.length;
  var num = [], txt = [], low = [];
  for (var c = 0; c < C; c++) {
    var src = D.data[c];
    if (cols[c].kind === "num") {
      var a = new Float64Array(N);
      for (var i = 0; i < N; i++) { a[i] = src[i] === null ? NaN : src[i]; }
      num.push(a); txt.push(null); low.push(null);
    } else {
      var t = new Array(N), l = new Array(N);
      for (var j = 0; j < N; j++) { t[j] = src[j] === null ? "" : String(src[j]); l[j] = t[j].toLowerCase(); }
      num.push(null); txt.push(t); low.push(l);
    }
  }
  var $ = function (id) { return document.getElementById(id); };
  var body = $("image-rows"), heads = document.querySelectorAll("#image-table th");
  var view = [], sortCol = -1, sortDir = 1, page = 0, pageSize = D.pageSize;

  function filter() {
    var q = $("filter-text").value.trim().toLowerCase();
    var fc = $("filter-col").value, fmin = parseFloat($("filter-min").value);
    var byValue = fc !== "" && !isNaN(fmin), vals = byValue ? num[+fc] : null;
    var out = [];
    for (var i = 0; i < N; i++) {
      if (q) {
        var hit = false;
        for (var c = 0; c < C && !hit; c++) { if (low[c] && low[c][i].indexOf(q) !== -1) { hit = true; } }
        if (!hit) { continue; }
      }
      if (byValue && !(vals[i] >= fmin)) { continue; }
      out.push(i);
    }
    view = out;
    sort();
    page = 0;
    render();
  }

  function sort() {
    if (sortCol < 0) { return; }
    var d = sortDir;
    if (num[sortCol]) {
      var v = num[sortCol];
      view.sort(function (a, b) {
        var x = v[a], y = v[b], nx = x !== x, ny = y !== y;
        if (nx || ny) { return nx === ny ? a - b : (nx ? 1 : -1); }
        return x < y ? -d : x > y ? d : a - b;
      });
    } else {
      var s = txt[sortCol];
      view.sort(function (a, b) {
        var x = s[a], y = s[b];
        if (!x || !y) { return !x === !y ? a - b : (!x ? 1 : -1); }
        return x < y ? -d : x > y ? d : a - b;
      });
    }
  }

  function cell(c, i) {
    var td = document.createElement("td");
    if (num[c]) {
      var v = num[c][i];
      td.className = "num";
      if (v === v) {
        td.textContent = v.toFixed(cols[c].digits);
        td.setAttribute("data-value", String(v));
        if (cols[c].digits === 3) {
          td.style.background = "rgba(198,40,40," + (0.35 * Math.max(0, Math.min(1, v))).toFixed(3) + ")";
        }
      }
    } else {
      td.className = "text";
      td.textContent = txt[c][i];
      td.title = txt[c][i];
    }
    return td;
  }

  function render() {
    var pages = Math.max(1, Math.ceil(view.length / pageSize));
    page = Math.max(0, Math.min(page, pages - 1));
    var frag = document.createDocumentFragment();
    var end = Math.min(view.length, (page + 1) * pageSize);
    for (var k = page * pageSize; k < end; k++) {
      var tr = document.createElement("tr"), i = view[k];
      tr.setAttribute("data-row", String(i));
      for (var c = 0; c < C; c++) { tr.appendChild(cell(c, i)); }
      frag.appendChild(tr);
    }
    body.textContent = "";
    body.appendChild(frag);
    $("row-count").textContent = view.length + " of " + N + " images";
    $("row-count").setAttribute("data-shown", String(view.length));
    $("page-info").textContent = "page " + (page + 1) + " of " + pages;
    $("first").disabled = $("prev").disabled = page === 0;
    $("next").disabled = $("last").disabled = page >= pages - 1;
  }

  function sortBy(c) {
    sortDir = sortCol === c ? -sortDir : (num[c] ? -1 : 1);
    sortCol = c;
    for (var h = 0; h < heads.length; h++) {
      heads[h].setAttribute("aria-sort", h === c ? (sortDir > 0 ? "ascending" : "descending") : "none");
    }
    sort();
    page = 0;
    render();
  }

  var timer = null;
  function later() { clearTimeout(timer); timer = setTimeout(filter, 120); }
  $("filter-text").addEventListener("input", later);
  $("filter-min").addEventListener("input", later);
  $("filter-col").addEventListener("change", filter);
  $("page-size").addEventListener("change", function () { pageSize = +this.value; page = 0; render(); });
  $("first").addEventListener("click", function () { page = 0; render(); });
  $("prev").addEventListener("click", function () { page -= 1; render(); });
  $("next").addEventListener("click", function () { page += 1; render(); });
  $("last").addEventListener("click", function () { page = Math.ceil(view.length / pageSize) - 1; render(); });
  Array.prototype.forEach.call(heads, function (th) {
    var c = +th.getAttribute("data-col");
    th.addEventListener("click", function () { sortBy(c); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(c); }
    });
  });
  filter();
  document.body.setAttribute("data-ready", "1");
})();
"""
