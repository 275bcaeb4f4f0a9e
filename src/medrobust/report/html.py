"""The report: one self-contained HTML page (inline CSS, inline PNG figures).

Tables show the numbers of the summary CSV with three decimals, so the page
and `robustness.csv` agree; nothing on the page loads an external asset.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import os
from typing import Any, Iterable, Mapping

import pandas as pd

from medrobust import __version__
from medrobust.errors import InputError
from medrobust.io.atomic import atomic_path
from medrobust.io.image_store import open_image_store
from medrobust.evaluate.metrics import METRIC_KEYS
from medrobust.report.figures import accuracy_vs_epsilon, accuracy_vs_severity, example_grid

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222;
       line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: center; }
th { background: #f3f3f3; }
td.name { text-align: left; font-weight: 600; }
.acc { display: block; font-weight: 600; }
.auc { display: block; color: #666; font-size: 0.85em; }
img { max-width: 100%; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
""".strip()

_HOW_TO_READ = """
<p>Every number is measured on the held-out <b>test split</b>. The large number in a cell is
the <b>accuracy</b> (fraction of test images classified correctly); below it, the <b>AUC</b>
(binary: ROC AUC of the second class; more classes: macro one-vs-rest; &ndash; where the test
labels hold a single class).</p>
<ul>
<li><b>Clean</b>: the unmodified test images.</li>
<li><b>Attack columns</b> (FGSM, IFGSM): adversarial images within an L&infin; budget
&epsilon; given in 1/255 of the intensity range. <i>White-box</i>: crafted with the evaluated
model's own gradients. <i>Black-box</i>: crafted on another model (named in the header) and
transferred, the setting of Xue et al. (MICCAI 2019).</li>
<li><b>Perturbation columns</b>: the severity is the noise standard deviation for
gaussian_noise, and the radius of the Gaussian frequency mask in cycles per image for lowpass
(smaller radius = stronger) and highpass (larger radius = stronger).</li>
</ul>
<p>A robust model keeps its clean accuracy along its row; a defense helps when its row falls
less than the undefended model's. In the curves, epsilon or severity 0 is the clean accuracy;
solid lines are white-box, dashed lines transfer attacks. In the example images the difference
column is amplified (factor in its title) around mid-grey.</p>
""".strip()


def write_report(summary_csv: str | os.PathLike, out_html: str | os.PathLike,
                 clean_stores: Iterable[str | os.PathLike] = (),
                 adversarial_stores: Iterable[str | os.PathLike] = (), n_examples: int = 4,
                 config: Mapping[str, Any] | None = None) -> None:
    """Write the report page from the summary CSV, the stores to picture and the config.

    Each adversarial store gets an example grid (clean / adversarial /
    difference for its first `n_examples` test images) against the clean store
    of its dataset. `config` (any JSON-able mapping, typically the workflow
    config) is shown as given.
    """
    summary = pd.read_csv(summary_csv)
    grids = example_grids(clean_stores, adversarial_stores, n_examples)
    page = render_report(summary, grids, config)
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")


def example_grids(clean_stores: Iterable[str | os.PathLike],
                  adversarial_stores: Iterable[str | os.PathLike], n_examples: int) -> list[bytes]:
    """One example grid (PNG) per adversarial store, paired with its dataset's clean store."""
    if n_examples < 1:
        return []
    clean_by_dataset = {open_image_store(path).attrs.get("dataset"): path for path in clean_stores}
    grids = []
    for path in adversarial_stores:
        dataset = open_image_store(path).attrs.get("dataset")
        if dataset not in clean_by_dataset:
            raise InputError(f"{path}: no clean store of its dataset {dataset!r} was given")
        grids.append(example_grid(clean_by_dataset[dataset], path, n_examples))
    return grids


def render_report(summary: pd.DataFrame, grids: list[bytes],
                  config: Mapping[str, Any] | None) -> str:
    """The page: tables, curves, the given example grids and the config."""
    images = summary[summary["family"] != "slide"]
    slides = summary[summary["family"] == "slide"]
    sections = [("How to read this", _HOW_TO_READ)]
    if (images["kind"] == "attack").any():
        sections.append(("At a glance", at_a_glance(images, config or {})))
    if not images.empty:
        sections.append(("Image classifiers: accuracy under attack and perturbation",
                         robustness_table(images)))
    if not slides.empty:
        sections.append(("Slide classifiers", slide_table(slides)))
    curves = []
    if (images["kind"] == "attack").any():
        curves.append(_png_tag(accuracy_vs_epsilon(images), "accuracy against epsilon"))
    if (images["kind"] == "perturbation").any():
        curves.append(_png_tag(accuracy_vs_severity(images), "accuracy against severity"))
    if curves:
        sections.append(("Accuracy curves", "\n".join(curves)))
    if grids:
        sections.append(("Example images", "\n".join(
            _png_tag(grid, "clean, adversarial and difference images") for grid in grids)))
    if config:
        sections.append(("Configuration",
                         f"<pre>{html.escape(json.dumps(config, indent=2, default=str))}</pre>"))
    sections.append(("All metrics", "<details><summary>every row of robustness.csv</summary>"
                     f"{metrics_table_html(summary)}</details>"))
    body = "\n".join(f"<section><h2>{html.escape(title)}</h2>\n{content}</section>"
                     for title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>medrobust robustness report</title>\n<style>\n{_CSS}\n</style>\n</head>\n"
            f"<body>\n<h1>medrobust robustness report</h1>\n"
            f"<p>medrobust {html.escape(__version__)}</p>\n{body}\n</body>\n</html>\n")


def _defense_name(model: str, config: Mapping[str, Any]) -> str:
    settings = config.get("image_classifiers", {}).get(model, {})
    return (settings.get("defense") or {}).get("name", "none")


def at_a_glance(images: pd.DataFrame, config: Mapping[str, Any]) -> str:
    """How fragile each attacked model is, and whether each defense beat each undefended model.

    Means are over every epsilon (and every transfer source) in the table, so
    models are compared on the same conditions.
    """
    def mean_accuracy(group: pd.DataFrame, kind: str, white_box: bool | None = None) -> float:
        rows = group[group["kind"] == kind]
        if white_box is not None:
            rows = rows[rows["white_box"].astype(str) == str(white_box)]
        return float(rows["accuracy"].mean()) if len(rows) else float("nan")

    summary = []
    for (dataset, model), group in images.groupby(["dataset", "model"], sort=False):
        if not (group["kind"] == "attack").any():
            continue
        summary.append({
            "dataset": dataset, "model": model, "defense": _defense_name(model, config),
            "n": int(group["n"].max()),
            "clean": mean_accuracy(group, "clean"),
            "white-box": mean_accuracy(group, "attack", True),
            "transfer": mean_accuracy(group, "attack", False),
            "perturbed": mean_accuracy(group, "perturbation"),
        })
    columns = ("clean", "white-box", "transfer", "perturbed")
    head = "".join(f"<th>{name}</th>" for name in ("dataset", "model", "defense", *columns))
    body = "\n".join(
        f'<tr><td class="name">{html.escape(row["dataset"])}</td>'
        f'<td class="name">{html.escape(row["model"])}</td><td>{html.escape(row["defense"])}</td>'
        + "".join(f"<td>{_number(row[column])}</td>" for column in columns) + "</tr>"
        for row in summary)
    verdicts = []
    for defended in (row for row in summary if row["defense"] != "none"):
        for plain in (row for row in summary
                      if row["defense"] == "none" and row["dataset"] == defended["dataset"]):
            changes = ", ".join(
                f"{column} {defended[column] - plain[column]:+.3f}" for column in columns
                if not (_missing(defended[column]) or _missing(plain[column])))
            # judged on transfer attacks (the studies' black-box setting) where there are any
            judged_on = "white-box" if _missing(defended["transfer"]) else "transfer"
            helped = defended[judged_on] > plain[judged_on]
            verdicts.append(
                f"<li><b>{html.escape(defended['model'])}</b> ({html.escape(defended['defense'])})"
                f" against <b>{html.escape(plain['model'])}</b>: {changes} &rarr; under "
                f"{judged_on} attacks the defense "
                f"{'helped' if helped else 'did not help'} here (on {defended['n']} test "
                f"images; small test sets make small differences noise).</li>")
    return (f"<p>Mean accuracy of each attacked model over all epsilons per threat model, and "
            f"over all perturbation severities.</p>\n<table><thead><tr>{head}</tr></thead>"
            f"<tbody>\n{body}\n</tbody></table>"
            + (f"<ul>\n{chr(10).join(verdicts)}\n</ul>" if verdicts else ""))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> str:
    """Three decimals, as a test or reader finds them; a dash where undefined."""
    return "&ndash;" if _missing(value) else f"{float(value):.3f}"


def _metric_cell(row: pd.Series | None) -> str:
    if row is None:
        return "<td>&ndash;</td>"
    return (f'<td><span class="acc">{_number(row["accuracy"])}</span>'
            f'<span class="auc">AUC {_number(row["auc"])}</span></td>')


def _column_key(row: pd.Series) -> tuple:
    """Where a condition goes: clean, then attacks (white-box before transfer), then perturbations."""
    if row["kind"] == "attack":
        transfer = row["source_model"] != row["model"]
        return (1, row["attack"], float(row["epsilon"]), transfer,
                row["source_model"] if transfer else "")
    if row["kind"] == "perturbation":
        return (2, row["perturbation"], float(row["severity"]))
    return (0,)


def _column_header(key: tuple) -> tuple[str, str]:
    """(group, sub-header) of a column; the clean column has no sub-header."""
    if key[0] == 1:
        _, attack, epsilon, transfer, source = key
        return (f"{attack.upper()} &epsilon;={epsilon:g}/255",
                f"black-box from {html.escape(source)}" if transfer else "white-box")
    if key[0] == 2:
        return html.escape(key[1]), f"severity {key[2]:g}"
    return "Clean", ""


def robustness_table(summary: pd.DataFrame) -> str:
    """Rows = models (each defense is a model); columns = conditions; accuracy with AUC."""
    cells: dict[tuple[str, str], dict[tuple, pd.Series]] = {}
    for _, row in summary.iterrows():
        cells.setdefault((row["dataset"], row["model"]), {})[_column_key(row)] = row
    columns = sorted({key for row_cells in cells.values() for key in row_cells})
    headers = [_column_header(key) for key in columns]
    top = ['<th rowspan="2">dataset</th>', '<th rowspan="2">model</th>']
    for group, members in itertools.groupby(headers, key=lambda header: header[0]):
        members = list(members)
        top.append(f'<th colspan="{len(members)}">{group}</th>' if members[0][1]
                   else f'<th rowspan="2">{group}</th>')
    sub_row = "".join(f"<th>{sub}</th>" for _, sub in headers if sub)
    body = []
    for (dataset, model), row_cells in cells.items():
        body.append(f'<tr><td class="name">{html.escape(str(dataset))}</td>'
                    f'<td class="name">{html.escape(str(model))}</td>'
                    + "".join(_metric_cell(row_cells.get(key)) for key in columns) + "</tr>")
    return (f'<table class="robustness">\n<thead><tr>{"".join(top)}</tr>\n<tr>{sub_row}</tr>'
            f"</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>")


def slide_table(summary: pd.DataFrame) -> str:
    """Slide classifiers on their clean test slides."""
    clean = summary[summary["kind"] == "clean"]
    rows = "\n".join(
        f'<tr><td class="name">{html.escape(str(row["dataset"]))}</td>'
        f'<td class="name">{html.escape(str(row["model"]))}</td><td>{int(row["n"])}</td>'
        f'{_metric_cell(row)}</tr>'
        for _, row in clean.iterrows())
    return ('<table class="slides">\n<thead><tr><th>dataset</th><th>model</th><th>test slides</th>'
            f"<th>clean</th></tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")


def _plain(column: str, value: Any) -> str:
    if column in ("accuracy", "auc"):
        return _number(value)
    if _missing(value):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:g}"
    return html.escape(str(value))


def metrics_table_html(summary: pd.DataFrame) -> str:
    """Every summary row and column, as in robustness.csv."""
    head = "".join(f"<th>{column}</th>" for column in METRIC_KEYS)
    rows = "\n".join("<tr>" + "".join(f"<td>{_plain(column, row[column])}</td>" for column in METRIC_KEYS)
                     + "</tr>" for _, row in summary.iterrows())
    return f'<table class="metrics">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>'


def _png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
