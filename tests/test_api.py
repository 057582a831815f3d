"""The public API at the top of the package: its names, and the examples in their docstrings, run."""

from __future__ import annotations

import doctest
import subprocess
import sys

from conftest import blob_images, write_pngs


def test_the_docstring_examples_run(tmp_path, monkeypatch):
    import aadetect

    write_pngs(tmp_path / "good", blob_images(120, seed=1))
    write_pngs(tmp_path / "labelled" / "good", blob_images(12, seed=2))
    write_pngs(tmp_path / "labelled" / "bad", blob_images(12, seed=3, anomalous=True))
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for example in (aadetect.train, aadetect.calibrate, aadetect.evaluate, aadetect.Detector.load):  # in order
        (test,) = doctest.DocTestFinder().find(example, globs={})
        assert test.examples, f"{example.__qualname__} has no example"
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_importing_the_package_imports_neither_torch_nor_scipy():
    code = ("import sys, aadetect; assert aadetect.__version__; "
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_public_names_are_the_librarys_own():
    import aadetect
    from aadetect.pipeline import calibrate, evaluate, train
    from aadetect.scoring import Detector

    assert (aadetect.train, aadetect.calibrate, aadetect.evaluate, aadetect.Detector) == (
        train, calibrate, evaluate, Detector)
    assert set(aadetect.__all__) <= set(dir(aadetect))
