"""`score --shard K/N` and `merge`: shards run side by side join into exactly the single run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aadetect.shards import Shard, chosen_shard
from conftest import invoke


def score_command(model_dir, *args) -> list[str]:
    return [sys.executable, "-m", "aadetect", "score", "--model", str(model_dir), "--quiet", *map(str, args)]


@pytest.mark.parametrize("format", ["jsonl", "csv"])
def test_three_shards_run_at_once_and_merged_equal_one_run(model_dir, dataset, tmp_path, format):
    inputs = [dataset["good"], dataset["anomalous"]]
    runs = []
    for index in range(3):  # side by side, as three machines would
        out = open(tmp_path / f"part-{index}.{format}", "wb")
        runs.append((subprocess.Popen(score_command(model_dir, *inputs, "--shard", f"{index}/3", "--format", format),
                                      stdout=out, stderr=subprocess.PIPE), out))
    for process, out in runs:
        assert process.wait(timeout=300) in (0, 1), process.stderr.read()
        out.close()
        process.stderr.close()
    parts = [tmp_path / f"part-{index}.{format}" for index in range(3)]
    whole = subprocess.run(score_command(model_dir, *inputs, "--format", format), capture_output=True)
    assert whole.returncode == 1
    merged = invoke("merge", *parts)
    assert merged.exit_code == 1  # as `score`: some are anomalous
    merged_lines, whole_lines = merged.stdout_bytes.splitlines(), whole.stdout.splitlines()
    if format == "csv":  # one header, first
        assert merged_lines[0] == whole_lines[0]
        merged_lines, whole_lines = merged_lines[1:], whole_lines[1:]
    assert sorted(merged_lines) == sorted(whole_lines) and len(whole_lines) == 24
    sizes = [len(invoke("merge", part).stdout.splitlines()) - (format == "csv") for part in parts]
    assert all(size > 0 for size in sizes) and sum(sizes) == 24  # every shard got some, none twice


def test_an_empty_shard_is_fine(model_dir, dataset):
    image = str(sorted(dataset["good"].iterdir())[0])
    empty = next(k for k in range(4) if not Shard(k, 4).holds(image))
    result = invoke("score", "--model", model_dir, image, "--shard", f"{empty}/4", "--format", "jsonl", "--quiet")
    assert result.exit_code == 0 and result.stdout == ""
    result = invoke("score", "--model", model_dir, image, "--shard", f"{empty}/4", "--format", "csv", "--quiet")
    assert result.exit_code == 0 and result.stdout.startswith("path,") and len(result.stdout.splitlines()) == 1


def test_merge_refuses_an_input_twice_and_checks_the_list(model_dir, dataset, tmp_path):
    part = tmp_path / "part.jsonl"
    images = sorted(dataset["good"].iterdir())[:3]
    part.write_text(invoke("score", "--model", model_dir, *images, "--format", "jsonl", "--quiet").stdout)
    twice = invoke("merge", part, part)
    assert twice.exit_code == 2 and "scored twice in" in twice.stderr
    listed = tmp_path / "inputs.txt"
    listed.write_text("".join(f"{path}\n" for path in images))
    assert invoke("merge", part, "--expect", listed).exit_code == 0
    listed.write_text("".join(f"{path}\n" for path in [*images, "elsewhere.png"]))
    missing = invoke("merge", part, "--expect", listed)
    assert missing.exit_code == 2 and "1 input(s) of the list are in no part (first: elsewhere.png)" in missing.stderr
    listed.write_text(f"{images[0]}\n")
    extra = invoke("merge", part, "--expect", listed)
    assert extra.exit_code == 2 and "not on the list" in extra.stderr
    csv_part = tmp_path / "part.csv"
    csv_part.write_text(invoke("score", "--model", model_dir, images[0], "--format", "csv", "--quiet").stdout)
    mixed = invoke("merge", part, csv_part)
    assert mixed.exit_code == 2 and "mix JSON lines and CSV" in mixed.stderr


def test_shards_are_chosen_by_the_path_alone_and_evenly():
    names = [f"incoming/batch-{i // 100}/img_{i:05d}.png" for i in range(4000)]
    counts = [sum(Shard(k, 4).holds(name) for name in names) for k in range(4)]
    assert sum(counts) == 4000 and min(counts) > 900  # each path in exactly one shard, about a quarter each
    odd = "caf\udce9/\n.png"  # a file name that is not UTF-8, with a newline
    assert sum(Shard(k, 3).holds(odd) for k in range(3)) == 1


def test_auto_takes_the_schedulers_index_and_never_shards_silently():
    notes = []
    assert chosen_shard(None, None, {"SLURM_ARRAY_TASK_ID": "3"}, notes.append) is None
    assert "SLURM_ARRAY_TASK_ID is set" in notes[0] and "--shard auto" in notes[0]
    slurm = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert chosen_shard("auto", None, slurm, notes.append) == Shard(3, 4)  # --array=1-4
    assert chosen_shard("auto", 5, {"JOB_COMPLETION_INDEX": "2"}, notes.append) == Shard(2, 5)
    assert chosen_shard("1/2", None, {"JOB_COMPLETION_INDEX": "0"}, notes.append) == Shard(1, 2)


@pytest.mark.parametrize("args, environ, message", [
    (["--shard", "3/3"], {}, "shard 3 of 3 does not exist"),
    (["--shard", "x"], {}, "--shard must be K/N"),
    (["--shard", "1/0"], {}, "does not exist"),
    (["--shard", "auto"], {}, "neither SLURM_ARRAY_TASK_ID"),
    (["--shard", "auto"], {"JOB_COMPLETION_INDEX": "1"}, "add --shards N"),
    (["--shards", "3"], {}, "--shards N goes with --shard auto"),
])
def test_bad_shards_are_one_line_errors(model_dir, dataset, monkeypatch, args, environ, message):
    for name in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    result = invoke("score", "--model", model_dir, dataset["good"], *args)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
