"""`aadetect evaluate --report`: one self-contained HTML page, the same bytes for the same inputs (but its
date), whose numbers are those of `evaluate --format json`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aadetect.metrics import auroc, average_precision
from conftest import invoke

EMBEDDED = re.compile(r'<script type="application/json" id="evaluation">(.*?)</script>', re.S)
TILE_SCORE = re.compile(r"score (-?[0-9.e+-]+) \(")


def evaluate_with_report(model_dir, good, anomalous, page: Path, *extra):
    return invoke("evaluate", "--model", model_dir, "--good", good, "--anomalous", anomalous, "--report", page,
                  "--format", "json", "--quiet", *extra)


def embedded_report(page: str) -> dict:
    return json.loads(EMBEDDED.search(page).group(1))


def section(page: str, anchor: str) -> str:
    """The page from the heading with id `anchor` to the next heading."""
    start = page.index(f'<h2 id="{anchor}">')
    end = page.find("<h2", start + 1)
    return page[start:end if end != -1 else len(page)]


def copy_images(source: Path, target: Path, prefix: str = "") -> None:
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted(source.iterdir()):
        shutil.copy(image, target / f"{prefix}{image.name}")


@pytest.fixture(scope="module")
def mixed_up(dataset, tmp_path_factory) -> dict[str, Path]:
    """Labelled folders the fixture model gets wrong: every anomalous image (and one twice) filed as good,
    three good images filed as anomalous."""
    root = tmp_path_factory.mktemp("mixed")
    good, anomalous = root / "good", root / "anomalous"
    copy_images(dataset["good"], good)
    copy_images(dataset["anomalous"], good, prefix="anomalous_")
    shutil.copy(sorted(dataset["anomalous"].iterdir())[0], good / "anomalous_again.png")
    copy_images(dataset["anomalous"], anomalous)
    for image in sorted(dataset["good"].iterdir())[:3]:
        shutil.copy(image, anomalous / f"good_{image.name}")
    return {"good": good, "anomalous": anomalous}


def test_the_page_shows_the_json_numbers_and_needs_no_network(model_dir, mixed_up, tmp_path):
    page_file = tmp_path / "report.html"
    result = evaluate_with_report(model_dir, mixed_up["good"], mixed_up["anomalous"], page_file)
    assert result.exit_code == 0, result.stderr
    page = page_file.read_text(encoding="utf-8")
    report = json.loads(result.stdout)
    assert embedded_report(page) == report
    ranking = {signal: (shown_auroc, shown_auprc) for signal, shown_auroc, shown_auprc in re.findall(
        r'<tr><td>(\w+)</td><td class="number">([0-9.]+)</td><td class="number">([0-9.]+)</td></tr>',
        section(page, "summary"))}
    assert list(ranking) == list(report["auroc"]) == ["reconstruction", "density", "combined"]
    for signal, (shown_auroc, shown_auprc) in ranking.items():
        assert (shown_auroc, shown_auprc) == (f"{report['auroc'][signal]:.4f}", f"{report['auprc'][signal]:.4f}")
    assert all(0.5 < value < 0.99 for value in report["auroc"].values())  # numbers with digits to round
    for name in ("balanced_accuracy", "f1", "tpr", "fpr"):
        assert f'<tr><td>{name}</td><td class="number">{report[name]:.4f}</td></tr>' in page
    for count in ("tp", "fp", "tn", "fn"):
        assert f'{report["confusion"][count]} ({count})' in section(page, "summary")
    # self-contained: nothing is fetched, images are inline, plots are inline SVG
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page)
    assert "<link" not in page and "@import" not in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert page.count("<svg") == 3


def test_the_same_inputs_give_the_same_page_but_for_its_date(model_dir, mixed_up, tmp_path):
    pages = []
    for name in ("first.html", "second.html"):
        assert evaluate_with_report(model_dir, mixed_up["good"], mixed_up["anomalous"], tmp_path / name
                                    ).exit_code == 0
        lines = (tmp_path / name).read_bytes().split(b"\n")
        assert len([line for line in lines if b'class="date"' in line]) == 1
        pages.append([line for line in lines if b'class="date"' not in line])
    assert pages[0] == pages[1]


def test_the_worst_mistakes_are_shown_with_their_maps(model_dir, mixed_up, tmp_path):
    page_file = tmp_path / "report.html"
    report = json.loads(evaluate_with_report(model_dir, mixed_up["good"], mixed_up["anomalous"], page_file).stdout)
    page = page_file.read_text(encoding="utf-8")
    false_positives, false_negatives = report["confusion"]["fp"], report["confusion"]["fn"]
    assert false_positives > 12 and false_negatives == 3  # more than are shown on one side
    for anchor, count, order in (("false-positives", false_positives, -1), ("false-negatives", false_negatives, 1)):
        shown = section(page, anchor)
        assert shown.count('<figure class="tile">') == min(12, count)
        assert shown.count('<img src="data:image/png') == 2 * min(12, count)  # each image and its map
        scores = [float(score) for score in TILE_SCORE.findall(shown)]
        assert len(scores) == min(12, count) and scores == sorted(scores, key=lambda score: order * score)
    assert "good_img_000.png" in section(page, "false-negatives")


def test_file_names_are_shown_as_text_never_as_markup(model_dir, dataset, tmp_path):
    """Anomalous images filed as good (so listed as false positives) under hostile names: markup, and bytes
    that are not UTF-8; and an unreadable file named as an HTML element."""
    good = tmp_path / "good"
    copy_images(dataset["good"], good)
    first, second = sorted(dataset["anomalous"].iterdir())[:2]
    try:
        (good / "<script>alert(1)<").mkdir()  # the file below makes the path hold "<script>alert(1)</script>.png"
        shutil.copy(first, good / "<script>alert(1)<" / "script>.png")
        shutil.copy(second, os.path.join(os.fsencode(good), b"caf\xe9.png"))
        (good / "<img src=x onerror=alert(1)>.png").write_text("not an image")
    except OSError:
        pytest.skip("this file system refuses such names")
    page_file = tmp_path / "report.html"
    result = evaluate_with_report(model_dir, good, dataset["anomalous"], page_file)
    assert result.exit_code == 2  # an unreadable image, as without --report; the page is written all the same
    page = page_file.read_bytes().decode("utf-8")  # strictly UTF-8
    assert embedded_report(page) == json.loads(result.stdout)
    assert "<script>alert" not in page and "<img src=x" not in page
    listed = section(page, "false-positives")
    assert f"{good}/&lt;script&gt;alert(1)&lt;/script&gt;.png" in listed
    assert f"{good}/caf\ufffd.png" in listed
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in section(page, "summary")
    assert "\\u003cimg src=x onerror=alert(1)\\u003e.png" in EMBEDDED.search(page).group(1)


def test_an_unwritable_report_is_said_before_scoring(model_dir, dataset, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    result = invoke("evaluate", "--model", model_dir, "--good", dataset["good"], "--anomalous", dataset["anomalous"],
                    "--report", not_a_folder / "report.html")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"aadetect: error: {not_a_folder / 'report.html'}: cannot write there "
                                          f"(Not a directory)"]


def test_without_the_extra_a_one_line_error_says_how_to_install(model_dir, dataset, tmp_path):
    page_file = tmp_path / "report.html"
    args = ["aadetect", "evaluate", "--model", str(model_dir), "--good", str(dataset["good"]), "--anomalous",
            str(dataset["anomalous"]), "--report", str(page_file)]
    probe = f"import sys; sys.modules['jinja2'] = None; from aadetect.cli import main; sys.argv = {args!r}; main()"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1  # no progress: nothing was scored
    assert "pip install 'aadetect[report]'" in result.stderr and "Traceback" not in result.stderr
    assert not page_file.exists()


@pytest.mark.parametrize("args", [["--help"], ["evaluate", "--help"]])
def test_help_imports_neither_matplotlib_nor_jinja2(args):
    probe = ("import runpy, sys\nsys.argv = ['aadetect', *sys.argv[1:]]\ntry:\n"
             "    runpy.run_module('aadetect', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('LOADED:' + ','.join(m for m in ('matplotlib', 'jinja2') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    if args[0] == "evaluate":
        assert "--report" in result.stdout
    assert result.stderr.splitlines()[-1] == "LOADED:"


def test_the_curves_enclose_the_reported_areas():
    from aadetect.report import pr_points, roc_points

    rng = np.random.default_rng(0)
    good, anomalous = rng.integers(0, 8, 40).astype(float), rng.integers(3, 12, 30).astype(float)  # many ties
    false_positive_rate, true_positive_rate = roc_points(good, anomalous)
    assert np.trapezoid(true_positive_rate, false_positive_rate) == pytest.approx(auroc(good, anomalous))
    recall, precision = pr_points(good, anomalous)
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(average_precision(good, anomalous))
    assert (recall[-1], false_positive_rate[-1], true_positive_rate[-1]) == (1, 1, 1)


def test_an_image_gone_since_it_was_scored_is_named_not_drawn(model_dir, mixed_up, tmp_path):
    from aadetect.pipeline import evaluation
    from aadetect.report import render_report, worst

    good = tmp_path / "good"
    shutil.copytree(mixed_up["good"], good)
    evaluated = evaluation(model_dir, good, mixed_up["anomalous"], device="cpu")
    gone = evaluated.good.refs[worst(evaluated.good, flagged=True)[0]].path
    gone.unlink()
    listed = section(render_report(evaluated, written="today"), "false-positives")
    assert listed.count('<figure class="tile">') == 12 and listed.count("<img ") == 2 * 11
    assert f"not drawn: {gone}: no such file" in listed
