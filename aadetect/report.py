"""`aadetect evaluate --report`: one self-contained HTML page of an evaluation.

Everything is inline (plots as SVG, images as PNG `data:` URIs), so the page opens with no
network and can be mailed or attached to a ticket as it is. Its numbers are the evaluation's
own: the page embeds the report dict that `--format json` prints, and shows its values rounded.
The same inputs give the same bytes, but for the line that says when the page was written.

Needs the `report` extra (matplotlib, jinja2): this module is imported only when a report is asked for.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
from markupsafe import Markup
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, StrMethodFormatter

from aadetect import __version__
from aadetect.atomic import write_text_atomic
from aadetect.errors import UserError
from aadetect.heatmaps import overlay
from aadetect.images import original_image
from aadetect.pipeline import Evaluation, ScoredImages, now, signals

WORST_SHOWN = 12  # misjudged images shown on each side
THUMBNAIL_SIDE = 128  # pixels, at most, of a thumbnail's longer side
HISTOGRAM_BINS = 30
GOOD_COLOUR, ANOMALOUS_COLOUR, FLAGGED_COLOUR = "#2c7bb6", "#d7191c", "#fdae61"
PLOT_STYLE = {"svg.fonttype": "none", "font.size": 9}  # text as text: no glyph outlines in the file


def write_report(path: str | Path, evaluation: Evaluation) -> None:
    """Write the evaluation's page to `path` atomically: a reader sees the old file or the whole new one."""
    write_text_atomic(Path(path), render_report(evaluation, written=now()))


def render_report(evaluation: Evaluation, *, written: str) -> str:
    """The page as text; `written` (a date) is its only part that is not determined by the evaluation."""
    report, detector = evaluation.report, evaluation.detector
    template = _environment().from_string(
        resources.files("aadetect").joinpath("report.html.j2").read_text(encoding="utf-8"))
    return template.render(
        report=report, evaluation=evaluation, card=evaluation.card, thresholds=detector.thresholds,
        written=written, version=__version__, report_json=Markup(script_json(report)),
        curves=svg(curves_figure, evaluation, "curves"), histograms=svg(histograms_figure, evaluation, "histograms"),
        plane=svg(plane_figure, evaluation, "plane"),
        false_positives=tiles(evaluation, evaluation.good, worst(evaluation.good, flagged=True)),
        false_negatives=tiles(evaluation, evaluation.anomalous, worst(evaluation.anomalous, flagged=False)))


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True, keep_trailing_newline=True, finalize=displayable)
    environment.filters.update(fixed=lambda value: f"{value:.4f}", digits=lambda value, count=4: f"{value:.{count}g}")
    return environment


def displayable(value):
    """What the page shows of each value: text from file names may hold bytes that are not UTF-8 (Python
    keeps them as surrogate escapes, which cannot be written), shown as U+FFFD; Markup (the SVGs, the JSON)
    as it is."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def script_json(report: dict) -> str:
    """The report as `--format json` prints it, safe inside <script>: no `<`, `>` or `&` that a file name
    could use to close the element."""
    text = json.dumps(report)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ----------------------------------------------------------------------------------------------- plots

def svg(draw, evaluation: Evaluation, name: str) -> Markup:
    """The figure that `draw` makes of the evaluation, as inline SVG with no date in it. Its ids (of clip
    paths, markers) are hashed with `name` rather than a random salt: the same from run to run, and
    distinct from the page's other figures'."""
    buffer = io.StringIO()
    with matplotlib.rc_context({**PLOT_STYLE, "svg.hashsalt": f"aadetect-{name}"}):
        draw(evaluation).savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return Markup(text[text.index("<svg"):])  # without the XML prolog, which has no place inside HTML


def new_figure(width: float, height: float, **subplots) -> tuple[Figure, np.ndarray]:
    """A figure (inches) and its axes, as a flat array."""
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(squeeze=False, **subplots).ravel()


def flagged_counts(good: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when everything at or above each distinct value is flagged, highest value
    first (tied values step together), as `aadetect.metrics.average_precision` counts them."""
    scores = np.concatenate([anomalous, good]).astype(np.float64)
    labels = np.concatenate([np.ones(len(anomalous)), np.zeros(len(good))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_group = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]
    true_positives = np.cumsum(labels)[last_of_group]
    return true_positives, last_of_group + 1 - true_positives


def roc_points(good: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every cut, from (0, 0) to (1, 1): joined by straight
    lines (tied values move both rates at once), their area is the AUROC."""
    true_positives, false_positives = flagged_counts(good, anomalous)
    return np.r_[0.0, false_positives / len(good)], np.r_[0.0, true_positives / len(anomalous)]


def pr_points(good: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recalls, precisions) at every cut, from recall 0: drawn as steps, their area is the average precision."""
    true_positives, false_positives = flagged_counts(good, anomalous)
    precision = true_positives / (true_positives + false_positives)
    return np.r_[0.0, true_positives / len(anomalous)], np.r_[precision[0], precision]


def curves_figure(evaluation: Evaluation) -> Figure:
    """ROC and precision-recall curves of each signal, labelled with the report's AUROC and AUPRC."""
    report = evaluation.report
    figure, (roc, pr) = new_figure(8, 3.4, ncols=2)
    for name, (good, anomalous) in signals(evaluation.good.scores, evaluation.anomalous.scores).items():
        roc.plot(*roc_points(good, anomalous), label=f"{name} ({report['auroc'][name]:.4f})")
        pr.plot(*pr_points(good, anomalous), drawstyle="steps-pre", label=f"{name} ({report['auprc'][name]:.4f})")
    roc.plot([0, 1], [0, 1], color="0.75", linestyle=":", linewidth=1)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (AUROC)",
            xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    pr.axhline(report["n_anomalous"] / (report["n_good"] + report["n_anomalous"]), color="0.75", linestyle=":",
               linewidth=1)
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall (AUPRC)", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02))
    for axes in (roc, pr):
        axes.legend(loc="lower right" if axes is roc else "lower left", fontsize=8)
    return figure


@dataclass(frozen=True)
class Signal:
    """One test of the OR rule as a histogram draws it: the values as measured, and the card's cut."""

    name: str
    label: str
    good: np.ndarray
    anomalous: np.ndarray
    cut: float
    flags_below: bool  # the density flags values below its cut; the other signals, above
    log_scale: bool


def measured_signals(evaluation: Evaluation) -> list[Signal]:
    """The report's signals (the keys of its AUROC), each with the cut it is decided by (the combined
    score's is 0: positive exactly when the rule fires)."""
    thresholds = evaluation.detector.thresholds
    good, anomalous = evaluation.good.scores, evaluation.anomalous.scores
    known = {
        "reconstruction": ("reconstruction error", "reconstruction_error", thresholds.reconstruction_cut, False, True),
        "density": ("log-density of the code", "log_density", thresholds.density_cut, True, False),
        "lookalike": ("log-odds of the anomalous kind", "anomaly_log_odds", thresholds.odds_cut, False, False),
        "combined": ("score (threshold units)", "score", 0.0, False, False),
    }
    chosen = []
    for name in evaluation.report["auroc"]:
        label, field, cut, flags_below, log_scale = known[name]
        chosen.append(Signal(name, label, getattr(good, field), getattr(anomalous, field), cut, flags_below,
                             log_scale))
    return chosen


def histogram_edges(good: np.ndarray, anomalous: np.ndarray, cut: float, flags_below: bool,
                    log_scale: bool) -> np.ndarray:
    """Bins over the good values and the cut, reaching past the cut on the flagged side as far again as
    four times the good images' own span (further anomalies count in the end bin: a far tail would
    otherwise squeeze the good images into one bar), on a log scale where the signal has one."""
    if log_scale:
        good, anomalous, cut = (np.log(np.where(v > 0, v, np.nan)) for v in (good, anomalous, np.float64(cut)))
    good, anomalous = good[np.isfinite(good)], anomalous[np.isfinite(anomalous)]
    everything = np.r_[good, anomalous, cut]
    unflagged = np.r_[good, cut]
    low, high = unflagged.min(), unflagged.max()
    reach = 4 * max(high - low, 1e-9)
    if flags_below:
        low = max(everything.min(), low - reach)
    else:
        high = min(everything.max(), high + reach)
    if low == high:
        low, high = low - 1, high + 1
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    return np.exp(edges) if log_scale else edges


def histograms_figure(evaluation: Evaluation) -> Figure:
    """Each signal's values for the good and the anomalous images, with the cut drawn and its flagged side
    shaded. Values past the bins (far anomalies, infinite ones, a zero error on the log scale) count in the
    end bins."""
    chosen = measured_signals(evaluation)
    columns = 2
    rows = math.ceil(len(chosen) / columns)
    figure, axes_list = new_figure(8, 2.8 * rows, nrows=rows, ncols=columns)
    for axes, signal in zip(axes_list, chosen):
        edges = histogram_edges(signal.good, signal.anomalous, signal.cut, signal.flags_below, signal.log_scale)
        for values, colour, label in ((signal.good, GOOD_COLOUR, "good"),
                                      (signal.anomalous, ANOMALOUS_COLOUR, "anomalous")):
            shown = np.clip(values[~np.isnan(values)], edges[0], edges[-1])
            axes.hist(shown, bins=edges, histtype="stepfilled", alpha=0.45, color=colour, edgecolor=colour,
                      label=f"{label} ({len(values)})")
        flagged_side = (edges[0], signal.cut) if signal.flags_below else (signal.cut, edges[-1])
        axes.axvspan(*flagged_side, color=FLAGGED_COLOUR, alpha=0.15, linewidth=0)
        axes.axvline(signal.cut, color="black", linestyle="--", linewidth=1, label=f"threshold {signal.cut:.4g}")
        if signal.log_scale:
            log_x_axis(axes, edges[0], edges[-1])
        axes.set(title=signal.name, xlabel=signal.label, ylabel="images", xlim=(edges[0], edges[-1]))
        axes.legend(fontsize=7)
    for unused in axes_list[len(chosen):]:
        unused.remove()
    return figure


def plane_figure(evaluation: Evaluation) -> Figure:
    """Each image by its reconstruction error (log scale) and log-density, with the region the OR rule flags
    shaded: error above its cut, or log-density below its cut."""
    thresholds = evaluation.detector.thresholds
    x_cut, y_cut = thresholds.reconstruction_cut, thresholds.density_cut
    sides = []
    for scores, colour, marker, label in ((evaluation.good.scores, GOOD_COLOUR, "o", "good"),
                                          (evaluation.anomalous.scores, ANOMALOUS_COLOUR, "x", "anomalous")):
        x, y = scores.reconstruction_error, scores.log_density
        drawable = np.isfinite(x) & np.isfinite(y) & (x > 0)  # a zero error has no place on a log scale
        sides.append((x[drawable], y[drawable], colour, marker, label))
    xs = np.concatenate([x for x, *_ in sides] + [[x_cut]])
    ys = np.concatenate([y for _, y, *_ in sides] + [[y_cut]])
    x_low, x_high = xs.min() / 1.25, xs.max() * 1.25
    y_margin = 0.08 * (ys.max() - ys.min()) or 1.0
    y_low, y_high = ys.min() - y_margin, ys.max() + y_margin
    figure, (axes,) = new_figure(6, 4.2)
    # the flagged region: the whole plane but the corner of low error and high density
    axes.fill([x_cut, x_high, x_high, x_low, x_low, x_cut], [y_high, y_high, y_low, y_low, y_cut, y_cut],
              color=FLAGGED_COLOUR, alpha=0.25, linewidth=0, label="flagged by the OR rule")
    axes.axvline(x_cut, color="black", linestyle="--", linewidth=1)
    axes.axhline(y_cut, color="black", linestyle="--", linewidth=1)
    for x, y, colour, marker, label in sides:
        axes.scatter(x, y, s=20, c=colour, marker=marker, linewidths=1, alpha=0.8, label=f"{label} ({len(x)})")
    log_x_axis(axes, x_low, x_high)
    axes.set(xlim=(x_low, x_high), ylim=(y_low, y_high), xlabel=f"reconstruction error (cut {x_cut:.4g})",
             ylabel=f"log-density (cut {y_cut:.4g})", title="the two signals and the OR rule")
    axes.legend(fontsize=7, loc="best")
    return figure


def log_x_axis(axes, low: float, high: float) -> None:
    """A log scale for values from `low` to `high`. Errors often span less than a decade, where every tick
    would be a minor one, labelled 3.2x10^-1 and crowded: there, a few plain numbers instead."""
    axes.set_xscale("log")
    if high < 10 * low:
        axes.xaxis.set_major_locator(MaxNLocator(5))
        axes.xaxis.set_major_formatter(StrMethodFormatter("{x:.3g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------------------------------- images

@dataclass(frozen=True)
class Tile:
    """One misjudged image as the page shows it: its name and numbers, and the image and its anomaly map as
    PNG `data:` URIs (None, with `problem` saying why, where it could not be read again)."""

    name: str
    numbers: dict
    image: str | None
    heatmap: str | None
    problem: str | None = None


def worst(scored: ScoredImages, *, flagged: bool) -> list[int]:
    """The most misjudged images, up to WORST_SHOWN: good ones flagged, highest score first (`flagged`), or
    anomalous ones not flagged, lowest score first; ties in folder order."""
    scores = scored.scores
    misjudged = np.flatnonzero(scores.anomaly == flagged)
    ranking = -scores.score[misjudged] if flagged else scores.score[misjudged]
    return misjudged[np.argsort(ranking, kind="stable")][:WORST_SHOWN].tolist()


def tiles(evaluation: Evaluation, scored: ScoredImages, indices: list[int]) -> list[Tile]:
    """The chosen images with their anomaly maps: scored again with maps (scoring gives each image the same
    numbers alone or in a folder), drawn over the image read afresh, both shrunk to thumbnails."""
    refs = [scored.refs[i] for i in indices]
    made = []
    for index, (ref, row, error) in zip(indices, evaluation.detector.score_images(refs, maps=True)):
        numbers = scored.scores.row(index)
        try:
            image = original_image(ref) if error is None else None
        except UserError as exc:
            error = str(exc)
        if error is not None:  # changed or removed since it was scored
            made.append(Tile(ref.name, numbers, None, None, error))
        else:
            made.append(Tile(ref.name, numbers, png_uri(image), png_uri(overlay(image, row["anomaly_map"]))))
    return made


def png_uri(image) -> str:
    """A Pillow image shrunk to a thumbnail, as a PNG `data:` URI (no metadata: the same pixels give the
    same text)."""
    thumbnail = image.copy()
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
