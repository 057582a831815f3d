"""Data-parallel training against one process: one MNIST (or Fashion-MNIST) class, trained with the real CLI
once as a plain `aadetect train` and once under `torchrun --nproc_per_node=N`, every process on one thread;
both models evaluated with `aadetect evaluate --format json` on the official test set (uncalibrated:
the default thresholds). Prints each one's AUROCs and wall time as a markdown table.

Examples
  benchmarks/fetch_data.sh
  python benchmarks/distributed.py                       # MNIST class 0, 1 process against 2
  python benchmarks/distributed.py --limit 2000 --json benchmarks/runs/ddp-mnist-c0.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import datasets as D  # noqa: E402


def cpu_seconds() -> float:
    """User and system time of the finished child processes (torchrun's workers included: it waits for them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """The finished command, its wall time and its CPU time."""
    started, cpu = time.perf_counter(), cpu_seconds()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result, seconds, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=D.DATASETS, default="mnist")
    parser.add_argument("--normal-class", type=int, default=0)
    parser.add_argument("--processes", type=int, default=2, help="torchrun's --nproc_per_node (default 2)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-args", default="", help="extra `aadetect train` arguments (quoted string)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("AADETECT_BENCH_CACHE", HERE / "cache")))
    parser.add_argument("--workdir", type=Path, default=None, help="default CACHE/work-ddp")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    workdir = args.workdir or args.cache / "work-ddp"

    dataset = D.load_dataset(args.dataset, args.cache)
    split = workdir / "splits" / D.oneclass_split_name(args.dataset, args.normal_class, args.seed)
    D.write_oneclass_split(dataset, args.normal_class, split, seed=args.seed)
    train_dir = split / "train" / "good"
    if args.limit is not None:  # a stated subset: the first N files by name
        subset = workdir / f"train-first-{args.limit}"
        if not subset.exists():
            subset.mkdir(parents=True)
            for path in sorted(train_dir.iterdir())[:args.limit]:
                shutil.copy(path, subset / path.name)
        train_dir = subset

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}  # one thread per process
    aadetect = [sys.executable, "-m", "aadetect"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.processes}", "-m", "aadetect"]
    rows = []
    for processes, launcher in ((1, aadetect), (args.processes, torchrun)):
        model = workdir / "models" / f"{split.name}-p{processes}"
        command = [*launcher, "train", str(train_dir), "--out", str(model), "--seed", str(args.seed),
                   "--device", "cpu", "--quiet", *args.train_args.split()]
        load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
        _, train_seconds, train_cpu = run(command, env)
        load_after = os.getloadavg()[0]
        evaluated, _, _ = run([*aadetect, "evaluate", "--model", str(model), "--good", str(split / "test" / "good"),
                            "--anomalous", str(split / "test" / "anomalous"), "--format", "json", "--quiet",
                            "--device", "cpu"], {**os.environ})
        report = json.loads(evaluated.stdout)
        card = yaml.safe_load((model / "card.yaml").read_text())
        rows.append({"processes": processes, "command": " ".join(command), "wall_seconds": round(train_seconds, 1),
                     "cpu_seconds": round(train_cpu, 1),
                     "training_seconds": card["training"]["seconds"], "world_size": card["training"]["world_size"],
                     "epochs_run": card["training"]["epochs_run"], "rejected": card["data"]["rejected_count"],
                     "images": card["data"]["image_count"], "auroc": report["auroc"],
                     "load_1min": [round(load_before, 2), round(load_after, 2)]})
        print(f"{processes} process(es): {rows[-1]}", file=sys.stderr)

    print("| processes | images | epochs | rejected | wall s (`train`) | in-process s | CPU s | AUROC combined | "
          "reconstruction | density | load before / after |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        auroc = row["auroc"]
        print(f"| {row['processes']} | {row['images']:,} | {row['epochs_run']} | {row['rejected']} | "
              f"{row['wall_seconds']:.1f} | {row['training_seconds']:.1f} | {row['cpu_seconds']:.1f} | "
              f"{auroc['combined']:.4f} | {auroc['reconstruction']:.4f} | {auroc['density']:.4f} | "
              f"{row['load_1min'][0]} / {row['load_1min'][1]} |")
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "normal_class": args.normal_class,
                                         "limit": args.limit, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
