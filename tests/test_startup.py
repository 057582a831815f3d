"""What each command imports: --help must stay instant, scoring must not pull in scipy or torchvision."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "torchvision", "scipy")

PROBE = """
import runpy, sys
sys.argv = ["aadetect", *sys.argv[1:]]
try:
    runpy.run_module("aadetect", run_name="__main__")
except SystemExit:
    pass
print("LOADED:" + ",".join(m for m in %r if m in sys.modules), file=sys.stderr)
""" % (HEAVY,)


def loaded_after(*args) -> set[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                            timeout=120)
    line = [l for l in result.stderr.splitlines() if l.startswith("LOADED:")][-1]
    return set(filter(None, line[len("LOADED:"):].split(",")))


def test_help_and_version_import_no_heavy_module():
    assert loaded_after("--help") == set()
    assert loaded_after("--version") == set()
    assert loaded_after("score", "--help") == set()


def test_scoring_needs_torch_but_not_scipy_or_torchvision(model_dir, dataset):
    one = sorted(dataset["good"].iterdir())[0]
    assert loaded_after("score", "--model", model_dir, "--format", "jsonl", one) == {"torch"}
