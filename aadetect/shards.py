"""Scoring in shards, and joining the shards' outputs.

A shard is chosen by hashing each input's path as given (a folder's files by their own paths), so any
machine, in any run, puts an image in the same shard without a shared file list. Sharding happens only
when asked: a scheduler's array index in the environment is mentioned, never acted on silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from aadetect.errors import UserError

SLURM_INDEX, SLURM_COUNT, SLURM_FIRST = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"
KUBERNETES_INDEX = "JOB_COMPLETION_INDEX"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def holds(self, path: str) -> bool:
        """Whether the input named `path` (as given; any bytes a file name may hold) is this shard's."""
        digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def chosen_shard(shard: str | None, shards: int | None, environ: Mapping[str, str],
                 note: Callable[[str], None]) -> Shard | None:
    """The shard asked for with `--shard K/N` or `--shard auto` (`shards`: the count, where the scheduler
    gives only an index), or None: every input. `note` is told of a scheduler index left unused."""
    if shard is None:
        if shards is not None:
            raise UserError("--shards N goes with --shard auto")
        found = [name for name in (SLURM_INDEX, KUBERNETES_INDEX) if name in environ]
        if found:
            note(f"{found[0]} is set, but without --shard every input is scored here (to score only this "
                 f"task's share, add --shard auto)")
        return None
    if shard != "auto":
        if shards is not None:
            raise UserError("--shards N goes with --shard auto (--shard K/N names the count itself)")
        return parsed_shard(shard, "--shard")
    if SLURM_INDEX in environ:
        if SLURM_COUNT not in environ and shards is None:
            raise UserError(f"--shard auto: {SLURM_INDEX} is set but {SLURM_COUNT} is not; add --shards N")
        count = shards if shards is not None else whole_number(environ[SLURM_COUNT], SLURM_COUNT)
        index = (whole_number(environ[SLURM_INDEX], SLURM_INDEX)
                 - whole_number(environ.get(SLURM_FIRST, "0"), SLURM_FIRST))  # arrays may start at 1 (--array=1-8)
        return checked(index, count, f"--shard auto ({SLURM_INDEX}={environ[SLURM_INDEX]})")
    if KUBERNETES_INDEX in environ:
        if shards is None:
            raise UserError(f"--shard auto: {KUBERNETES_INDEX} gives the index only; add --shards N "
                            f"(the Job's completions)")
        index = whole_number(environ[KUBERNETES_INDEX], KUBERNETES_INDEX)
        return checked(index, shards, f"--shard auto ({KUBERNETES_INDEX}={environ[KUBERNETES_INDEX]})")
    raise UserError(f"--shard auto: neither {SLURM_INDEX} (Slurm) nor {KUBERNETES_INDEX} (a Kubernetes Indexed "
                    f"Job) is set; give --shard K/N")


def parsed_shard(text: str, option: str) -> Shard:
    index, slash, count = text.partition("/")
    if not slash:
        raise UserError(f"{option} must be K/N (e.g. 0/4) or auto, got {text!r}")
    return checked(whole_number(index, option), whole_number(count, option), option)


def whole_number(text: str, name: str) -> int:
    if not text.strip().isdigit():
        raise UserError(f"{name} must be a whole number, got {text!r}")
    return int(text)


def checked(index: int, count: int, source: str) -> Shard:
    if count < 1 or not 0 <= index < count:
        raise UserError(f"{source}: shard {index} of {count} does not exist (K/N needs 0 <= K < N)")
    return Shard(index, count)


# ------------------------------------------------------------------------------------------------ merge

@dataclass(frozen=True)
class Part:
    """One shard's output as `score` wrote it: its format, CSV header (or None), and (path, row, text) rows,
    `text` being the row as written, so that merging changes no byte."""

    format: str  # "jsonl" or "csv"
    header: list[str] | None
    rows: list[tuple[str, dict, str]]


def read_part(path: Path) -> Part:
    """A `score --format jsonl` or `--format csv` output, told apart by its first character."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")  # file names are any bytes, written as such
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not text.strip() or text.lstrip().startswith("{"):
        rows = []
        for number, line in enumerate(text.splitlines(keepends=True), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise UserError(f"{path}: line {number} is not a score row (no path)")
            rows.append((row["path"], row, line if line.endswith("\n") else line + "\n"))
        return Part("jsonl", None, rows)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    if "path" not in header:
        raise UserError(f"{path}: neither JSON lines nor a CSV with a 'path' column, as `aadetect score` writes")
    rows = []
    for values in reader:
        if len(values) != len(header):
            raise UserError(f"{path}: CSV row {reader.line_num} has {len(values)} fields, its header {len(header)}")
        row = dict(zip(header, values))
        rows.append((row["path"], row, csv_line(values)))
    return Part("csv", header, rows)


def csv_line(values: list[str]) -> str:
    """A row as `score` writes it (csv's default quoting, '\\n' line ends)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


@dataclass(frozen=True)
class Merged:
    text: str  # what to print: the header (CSV), then every part's rows in the order given
    anomalous: bool  # some row is anomalous
    failed: int  # rows that hold an error (an input that could not be scored)


def merge(paths: list[Path], expected: list[str] | None = None) -> Merged:
    """The parts joined, each input once: a path in two parts (or twice in one) is an error, and with
    `expected`, so is one of the list that no part holds, or a row for a path not on the list."""
    parts = [(path, read_part(path)) for path in paths]
    formats = {part.format for _, part in parts if part.rows or part.header}
    if len(formats) > 1:
        raise UserError("the parts mix JSON lines and CSV; merge outputs of one format")
    headers = {tuple(part.header) for _, part in parts if part.header is not None}
    if len(headers) > 1:
        raise UserError("the CSV parts have different columns")
    seen: dict[str, Path] = {}
    lines = [csv_line(list(headers.pop()))] if headers else []
    anomalous, failed = False, 0
    for path, part in parts:
        for name, row, line in part.rows:
            if name in seen:
                where = f"twice in {path}" if seen[name] == path else f"in both {seen[name]} and {path}"
                raise UserError(f"{name}: scored {where}")
            seen[name] = path
            anomalous |= row.get("anomaly") in (True, "true")
            failed += row.get("error") not in (None, "")
            lines.append(line)
    if expected is not None:
        if len(set(expected)) != len(expected):
            raise UserError("the list names an input twice")
        missing = [name for name in expected if name not in seen]
        unexpected = sorted(set(seen) - set(expected))
        if missing:
            raise UserError(f"{len(missing)} input(s) of the list are in no part (first: {missing[0]})")
        if unexpected:
            raise UserError(f"{len(unexpected)} row(s) are for paths not on the list (first: {unexpected[0]})")
    return Merged("".join(lines), anomalous, failed)
