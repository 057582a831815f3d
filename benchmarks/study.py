"""Offline studies: train variants in-process exactly as `aadetect train` does, keep their numbers, compare.

`oneclass.py` answers "how good are the defaults" through the real CLI. This answers "would X be
better" cheaply: each (variant, split) is trained once with `aadetect.pipeline.fit_detector` (the
core of `train`), and the reconstruction error and log-density of every held-out, calibration and
test image are saved. `report` then scores any mix of them offline: the calibrated OR rule (as
`calibrate` + `evaluate` would), each signal alone, other fusions of the two, and ensembles of
variants trained with the same seed (so with the same held-out images): ``base+adv`` averages the
log-densities and the log errors of both networks.

Splits are folders in the layout `oneclass.py` writes (train/good, calibrate/{good,anomalous},
test/{good,anomalous}); `--demo-seeds` adds the demo's generated cells in that layout.

Examples
  python benchmarks/oneclass.py --dataset fashion --methods pca-kde          # writes the splits once
  python benchmarks/study.py measure --variant base --splits 'benchmarks/cache/work6/splits/fashion-oneclass-*'
  python benchmarks/study.py measure --variant adv --set adversarial=True --splits ... --demo-seeds 0,1
  python benchmarks/study.py report --variants base,adv,base+adv --splits 'fashion-oneclass-*'
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import glob
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from aadetect.calibration import Measurements, choose_thresholds  # noqa: E402
from aadetect.config import TrainConfig  # noqa: E402
from aadetect.metrics import auroc, confusion, decision_metrics  # noqa: E402
from aadetect.scoring import decide  # noqa: E402

SETS = {"validation": None, "calibrate_good": "calibrate/good", "calibrate_anomalous": "calibrate/anomalous",
        "test_good": "test/good", "test_anomalous": "test/anomalous"}
DEMO_FOLDERS = {"train": "train/good", "calibrate_good": "calibrate/good", "calibrate_anomalous": "calibrate/anomalous",
                "test_good": "test/good", "test_anomalous": "test/anomalous"}


def study_config(split: Path, overrides: dict) -> TrainConfig:
    """`train`'s defaults (the demo's for its cells), seed 0, on the CPU, with the variant's overrides."""
    from aadetect.demo import demo_config

    base = demo_config() if split.name.startswith("demo-") else TrainConfig(device="cpu")
    return dataclasses.replace(base, **overrides)


def parse_overrides(text: str) -> dict:
    """'adversarial=True,epochs=30' -> typed TrainConfig fields."""
    defaults, overrides = TrainConfig(), {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in TrainConfig.__dataclass_fields__:
            raise SystemExit(f"--set: TrainConfig has no field {name!r}")
        kind = type(getattr(defaults, name))
        overrides[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return overrides


def write_demo_split(root: Path, seed: int) -> Path:
    """The demo's cells (`aadetect demo`'s data for this seed) in the split layout, written whole or not at all
    (studies run side by side may ask for it at once)."""
    import os
    import shutil

    from aadetect.demo import DEMO_IMAGE_SIZE, DEMO_TRAIN_IMAGES
    from aadetect.synthetic import write_demo_dataset

    split = root / f"demo-s{seed}"
    if split.is_dir():
        return split
    partial = root / f".demo-s{seed}.partial-{os.getpid()}"
    folders = write_demo_dataset(partial / "generated", seed=seed, size=DEMO_IMAGE_SIZE, n_train=DEMO_TRAIN_IMAGES)
    for key, relative in DEMO_FOLDERS.items():
        (partial / relative).parent.mkdir(parents=True, exist_ok=True)
        folders[key].rename(partial / relative)
    (partial / "generated").rmdir()
    try:
        partial.rename(split)
    except OSError:  # another study wrote it first
        shutil.rmtree(partial)
    return split


def measure(split: Path, config: TrainConfig, out: Path) -> str:
    """Train one variant on one split and save every image's numbers, as `calibrate` and `evaluate` see them."""
    from aadetect.atomic import write_atomic
    from aadetect.images import find_images, load_images
    from aadetect.pipeline import fit_detector, learn_kind, measure_anomalous, read_training_images
    from aadetect.progress import Reporter

    started = time.perf_counter()
    pixels, refs, _ = read_training_images(split / "train" / "good", config, Reporter())
    fitted = fit_detector(pixels, config)
    train_seconds = time.perf_counter() - started
    numbers = {"validation_reconstruction_error": fitted.validation.reconstruction_error,
               "validation_log_density": fitted.validation.log_density}
    detector = fitted.detector
    read = lambda folder: load_images(find_images(split / folder), detector.image_size, detector.channels)[0]  # noqa: E731
    # as `calibrate` does before it measures anything: learn the anomalous samples' kind
    anomalous_samples = read(SETS["calibrate_anomalous"])
    kind = learn_kind(detector, read(SETS["calibrate_good"]), anomalous_samples, Reporter())
    detector = detector.with_kind(kind)
    for name, folder in SETS.items():
        if folder is not None:
            measured = detector.measure(read(folder))
            numbers[f"{name}_reconstruction_error"], numbers[f"{name}_log_density"] = (measured.reconstruction_error,
                                                                                      measured.log_density)
            if measured.anomaly_log_odds is not None:
                numbers[f"{name}_anomaly_log_odds"] = measured.anomaly_log_odds
    if detector.mixture is not None:
        numbers["calibrate_anomalous_anomaly_log_odds"] = measure_anomalous(detector, anomalous_samples).anomaly_log_odds
    numbers["held_out_log_density"], held_out_odds = detector.log_densities(fitted.held_out_codes)
    if held_out_odds is not None:
        numbers["held_out_anomaly_log_odds"] = held_out_odds
    rejected = np.array([refs[i].name for i in fitted.training.rejected])

    def save(temp: Path) -> None:
        with open(temp, "wb") as handle:  # a file object: given a path, np.savez would add ".npz" to it
            np.savez(handle, train_seconds=train_seconds, rejected=rejected,
                     lookalikes=np.array(kind.lookalikes, dtype=np.int64),
                     settings=repr(config), **numbers)

    write_atomic(out, save)  # a run stopped half-way must not leave a file that the next run keeps
    return (f"{out.parent.name} {split.name}: trained in {train_seconds:.0f} s, {len(fitted.training.rejected)} "
            f"rejected, {len(kind.lookalikes)} left out as like the anomalous samples")


def load(results: Path, variants: str, split: str) -> dict | None:
    """One variant's numbers, or an ensemble's ('a+b'): mean log-density, geometric-mean error."""
    parts = [results / name / f"{split}.npz" for name in variants.split("+")]
    if not all(part.is_file() for part in parts):
        return None
    saved = [np.load(part) for part in parts]

    def mean(key: str):
        return np.mean([s[key] for s in saved], 0) if all(key in s for s in saved) else None

    numbers = {name: Measurements(np.exp(np.mean([np.log(s[f"{name}_reconstruction_error"]) for s in saved], 0)),
                                  mean(f"{name}_log_density"), mean(f"{name}_anomaly_log_odds")) for name in SETS}
    held_out = mean("held_out_log_density")  # the held-out images against the calibrated density
    numbers["held_out"] = None if held_out is None else Measurements(numbers["validation"].reconstruction_error,
                                                                     held_out, mean("held_out_anomaly_log_odds"))
    return {**numbers, "train_seconds": sum(float(s["train_seconds"]) for s in saved)}


def scores_with_only_reconstruction_above_its_cut(measured: Measurements, thresholds) -> np.ndarray:
    """The OR rule's decisions, ranked by the density except where the reconstruction rule fires."""
    scores = decide(measured, thresholds)
    density_excess = (thresholds.density_cut - measured.log_density) / thresholds.density.scale
    return np.where(np.isin(scores.reason, ("reconstruction", "both")), scores.score, density_excess)


def evaluate(numbers: dict) -> dict[str, float]:
    """The calibrated OR rule as `calibrate` and `evaluate` compute it, each signal alone, and other fusions:
    both robust z-scores (on the held-out images) at one height, or added; the density's ranking except where
    the reconstruction rule fires; and the density alone where it ranks the calibration samples better."""
    from aadetect.calibration import default_thresholds, robust_scale

    good, anomalous = numbers["test_good"], numbers["test_anomalous"]
    defaults = default_thresholds(numbers["validation"], TrainConfig.target_fpr)
    thresholds = choose_thresholds(defaults, numbers["calibrate_good"], numbers["calibrate_anomalous"],
                                   held_out=numbers["held_out"], default_fpr=TrainConfig.target_fpr).thresholds
    good_scores, anomalous_scores = decide(good, thresholds), decide(anomalous, thresholds)
    validation = numbers["validation"]
    log_error = np.log(validation.reconstruction_error)

    def robust_z(measured: Measurements) -> tuple[np.ndarray, np.ndarray]:
        return ((np.log(measured.reconstruction_error) - np.median(log_error)) / robust_scale(log_error),
                (np.median(validation.log_density) - measured.log_density) / robust_scale(validation.log_density))

    (good_error_z, good_density_z), (anomalous_error_z, anomalous_density_z) = robust_z(good), robust_z(anomalous)
    calibrate_good, calibrate_anomalous = numbers["calibrate_good"], numbers["calibrate_anomalous"]
    density_ranks_samples_better = (
        auroc(-calibrate_good.log_density, -calibrate_anomalous.log_density)
        > auroc(decide(calibrate_good, thresholds).score, decide(calibrate_anomalous, thresholds).score))
    combined, density = (auroc(good_scores.score, anomalous_scores.score),
                         auroc(-good.log_density, -anomalous.log_density))
    return {
        "combined": combined,
        "density": density,
        "reconstruction": auroc(good.reconstruction_error, anomalous.reconstruction_error),
        "balanced_accuracy": float(decision_metrics(**confusion(good_scores.anomaly,
                                                                anomalous_scores.anomaly))["balanced_accuracy"]),
        "equal_heights": auroc(np.maximum(good_error_z, good_density_z),
                               np.maximum(anomalous_error_z, anomalous_density_z)),
        "z_sum": auroc(good_error_z + good_density_z, anomalous_error_z + anomalous_density_z),
        "reconstruction_above_cut": auroc(scores_with_only_reconstruction_above_its_cut(good, thresholds),
                                          scores_with_only_reconstruction_above_its_cut(anomalous, thresholds)),
        # the density alone where it ranks the calibration samples strictly better than the OR rule
        "calibrated_choice": density if density_ranks_samples_better else combined,
    }


def report(results: Path, variants: list[str], patterns: list[str]) -> None:
    splits = sorted({path.stem for variant in variants for part in variant.split("+")
                     for path in (results / part).glob("*.npz")
                     if any(fnmatch.fnmatch(path.stem, pattern) for pattern in patterns)})
    columns = None
    for variant in variants:
        rows = {}
        for split in splits:
            numbers = load(results, variant, split)
            if numbers is not None:
                rows[split] = {**evaluate(numbers), "train_seconds": numbers["train_seconds"]}
        if not rows:
            continue
        columns = columns or list(next(iter(rows.values())))
        rows[f"**mean ({len(rows)})**"] = {c: float(np.mean([row[c] for row in rows.values()])) for c in columns}
        print(f"\n### {variant}\n\n| split | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
        for split, row in rows.items():
            print(f"| {split} | " + " | ".join(f"{row[c]:.0f}" if c == "train_seconds" else f"{row[c]:.4f}"
                                              for c in columns) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "runs" / "study", help="one folder per variant")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure", help="train a variant on splits and save its numbers")
    run.add_argument("--variant", required=True, help="a name for the saved numbers")
    run.add_argument("--set", default="", help="TrainConfig overrides, e.g. adversarial=True,epochs=30")
    run.add_argument("--splits", default="", help="split folders (glob patterns, comma separated)")
    run.add_argument("--demo-seeds", default="", help="also the demo's cells for these seeds (comma separated)")
    run.add_argument("--workdir", type=Path, default=HERE / "cache" / "work6", help="demo splits go under splits/")
    run.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    show = commands.add_parser("report", help="markdown tables of saved numbers")
    show.add_argument("--variants", required=True, help="comma separated; a+b is an ensemble")
    show.add_argument("--splits", default="*", help="split names (patterns, comma separated)")
    args = parser.parse_args(argv)

    if args.command == "report":
        report(args.results, args.variants.split(","), args.splits.split(","))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    splits = [Path(path) for pattern in filter(None, args.splits.split(",")) for path in sorted(glob.glob(pattern))]
    splits += [write_demo_split(args.workdir / "splits", int(seed)) for seed in filter(None, args.demo_seeds.split(","))]
    if not splits:
        raise SystemExit("no split folders matched")
    for split in splits:
        out = args.results / args.variant / f"{split.name}.npz"
        if out.is_file():
            print(f"{args.variant} {split.name}: kept from an earlier run", file=sys.stderr)
            continue
        print(measure(split, study_config(split, overrides), out), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
