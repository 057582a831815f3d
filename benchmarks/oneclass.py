"""One-class benchmark: aadetect (through its real CLI), its ablations and peers.

Writes the standard splits as PNG folders (see benchmarks/datasets.py), then on
each split runs every requested method and prints markdown tables; the full
results (settings, environment, per-split numbers) go to a JSON file under
benchmarks/runs/, rewritten after every finished (split, method) so that a long
run that dies keeps what it measured (``--resume FILE`` picks it up again).

Methods
  aadetect            aadetect train (defaults) / calibrate / evaluate --format json
  aadetect-adv        the same with ``train --adversarial`` (Gaussian prior on the codes)
  aadetect-recon      plain autoencoder, reconstruction error alone: the default
                      (prior off) model's auroc.reconstruction (reuses that run)
  aadetect-norobust   ``train --no-robust`` (outlier rejection off)
  aadetect-oneclass   the default model calibrated again with ``--one-class``: the anomalous
                      samples only place the thresholds (a copy of that run's model folder)
  pca-kde             PCA (numpy SVD) of the raw pixels to 32 dims + scipy gaussian_kde;
                      score = -logpdf
  pyod-ae             PyOD AutoEncoder on flattened [0,1] pixels
  pyod-deepsvdd       PyOD DeepSVDD on flattened [0,1] pixels

Peers are scored by AUROC over the official test set (Mann-Whitney U, ties 1/2)
and by balanced accuracy at a threshold picked on the 10+10 calibration images
(the threshold that maximises balanced accuracy there; midpoint of the widest
best range).

Examples
  benchmarks/fetch_data.sh
  python benchmarks/oneclass.py --dataset mnist
  python benchmarks/oneclass.py --dataset fashion --methods pca-kde,pyod-ae,pyod-deepsvdd
  python benchmarks/oneclass.py --dataset mnist --protocol contamination
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import datasets as D  # noqa: E402

AADETECT_METHODS = ("aadetect", "aadetect-adv", "aadetect-recon", "aadetect-norobust", "aadetect-oneclass")
PEER_METHODS = ("pca-kde", "pyod-ae", "pyod-deepsvdd")
ALL_METHODS = AADETECT_METHODS + PEER_METHODS
DEFAULT_METHODS = {
    "oneclass": ("aadetect", "aadetect-oneclass", "aadetect-adv", "aadetect-recon") + PEER_METHODS,
    "contamination": ("aadetect", "aadetect-oneclass", "aadetect-adv", "aadetect-recon", "aadetect-norobust")
    + PEER_METHODS,
}
# extra `aadetect train` flags per aadetect variant; aadetect-recon reuses the default model
VARIANT_TRAIN_ARGS = {
    "aadetect": [],
    "aadetect-adv": ["--adversarial"],
    "aadetect-norobust": ["--no-robust"],
    "aadetect-oneclass": [],  # not trained: the default model, copied
}
VARIANT_CALIBRATE_ARGS = {"aadetect-oneclass": ["--one-class"]}
# contamination protocol defaults (Beggel et al., ECML-PKDD 2019)
CONTAMINATION_DEFAULTS = {
    "mnist": {"normal": 0, "anomaly": 2, "alphas": [0.0, 0.01, 0.05]},
    "fashion": {"normal": 0, "anomaly": 2, "alphas": [0.01]},
}

PCA_DIMS = 32
# PyOD DeepSVDD's default is 100 epochs; on 2 busy cores that took ~5 min per class,
# so the benchmark uses a fixed 20 (~1 min or less per class). --svdd-epochs 100 for PyOD's.
SVDD_EPOCHS = 20


def log(msg: str) -> None:
    print(f"[oneclass {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- metrics


def auroc(scores_good, scores_anomalous) -> float:
    """AUROC of "higher score = more anomalous", via the Mann-Whitney U statistic."""
    from scipy.stats import mannwhitneyu

    g = np.asarray(scores_good, dtype=np.float64)
    a = np.asarray(scores_anomalous, dtype=np.float64)
    if len(g) == 0 or len(a) == 0:
        raise ValueError("AUROC needs good and anomalous scores")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(a))):
        # -inf/inf are legitimate extreme scores (e.g. log-density underflow); NaN is not
        if np.any(np.isnan(g)) or np.any(np.isnan(a)):
            raise ValueError("NaN score")
        both = np.concatenate([g, a])
        fin = both[np.isfinite(both)]
        lo, hi = (fin.min(), fin.max()) if len(fin) else (0.0, 0.0)
        g = np.clip(g, lo - 1.0, hi + 1.0)
        a = np.clip(a, lo - 1.0, hi + 1.0)
    u = mannwhitneyu(a, g, alternative="two-sided").statistic  # U of the anomalous sample
    return float(u) / (len(a) * len(g))


def balanced_accuracy(scores_good, scores_anomalous, threshold: float) -> float:
    """Balanced accuracy of predicting "anomalous" when score > threshold."""
    g = np.asarray(scores_good, dtype=np.float64)
    a = np.asarray(scores_anomalous, dtype=np.float64)
    tpr = float(np.mean(a > threshold))
    tnr = float(np.mean(g <= threshold))
    return 0.5 * (tpr + tnr)


def calibrate_threshold(cal_good, cal_anomalous) -> float:
    """Threshold maximising balanced accuracy on the calibration scores.

    Candidates are the midpoints between consecutive distinct scores (plus one
    below and one above all). Among the best, the midpoint of the widest gap wins
    (ties: the one nearest the median of the best candidates), which for a
    separable calibration set is the middle of the gap between the classes.
    """
    g = np.asarray(cal_good, dtype=np.float64)
    a = np.asarray(cal_anomalous, dtype=np.float64)
    vals = np.unique(np.concatenate([g, a]))
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return 0.0
    span = float(vals[-1] - vals[0]) or 1.0
    edges = np.concatenate([[vals[0] - span], vals, [vals[-1] + span]])
    cands = 0.5 * (edges[:-1] + edges[1:])
    widths = np.diff(edges)
    bas = np.array([balanced_accuracy(g, a, t) for t in cands])
    best = np.flatnonzero(np.isclose(bas, bas.max()))
    wmax = widths[best].max()
    best = best[np.isclose(widths[best], wmax)]
    return float(cands[best[len(best) // 2]])


# ------------------------------------------------------------------ environment


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    cpu = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    commit = None
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": commit,
        "versions": {
            name: _version(name)
            for name in ("aadetect", "torch", "numpy", "scipy", "pillow", "pyod", "scikit-learn")
        },
    }


# ---------------------------------------------------------------- aadetect CLI


def find_cli(explicit: str | None) -> list[str]:
    """The command that runs the aadetect CLI."""
    if explicit:
        return shlex.split(explicit)
    beside = Path(sys.executable).parent / "aadetect"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("aadetect")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from aadetect.cli import main; sys.exit(main())"]


def _run(cmd: list[str], log_path: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    log(f"$ {shlex.join(cmd)}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        elapsed = time.perf_counter() - t0
        with log_path.open("a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n# TIMEOUT after {elapsed:.0f}s\n")
        raise RuntimeError(f"timed out after {elapsed:.0f}s: {shlex.join(cmd[:3])} ...") from exc
    elapsed = time.perf_counter() - t0
    with log_path.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n# exit {proc.returncode} in {elapsed:.1f}s\n")
        fh.write("## stdout\n" + proc.stdout + "\n## stderr\n" + proc.stderr + "\n")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).strip().splitlines()]
        tail = [ln for ln in lines if ln and set(ln) - set("^~ ")][-3:]
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(cmd[:3])} ...: " + " | ".join(tail))
    return proc, elapsed


def _parse_json_output(text: str) -> dict:
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    # tolerate a line of noise before/after the object
    start, end = text.find("{"), text.rfind("}")
    if start >= 0 and end > start:
        return json.loads(text[start:end + 1])
    raise ValueError(f"no JSON object in evaluate output: {text[:200]!r}")


class AadetectRunner:
    """Runs train/calibrate/evaluate per (split, variant); caches models in the invocation."""

    def __init__(self, cli: list[str], workdir: Path, seed: int, timeout: float, extra_train_args: list[str]):
        self.cli = cli
        self.workdir = workdir
        self.seed = seed
        self.timeout = timeout
        self.extra_train_args = extra_train_args
        self._done: dict[tuple[str, str], dict] = {}

    def variant(self, split_name: str, split_dir: Path, variant: str) -> dict:
        key = (split_name, variant)
        if key in self._done:
            return self._done[key]
        run_dir = self.workdir / "models" / split_name / variant
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        model = run_dir / "model"
        log_path = run_dir / "commands.log"
        train_cmd = [
            *self.cli, "train", str(split_dir / "train" / "good"), "--out", str(model),
            "--seed", str(self.seed), "--quiet", *VARIANT_TRAIN_ARGS[variant], *self.extra_train_args,
        ]
        cal_cmd = [
            *self.cli, "calibrate", "--model", str(model),
            "--good", str(split_dir / "calibrate" / "good"),
            "--anomalous", str(split_dir / "calibrate" / "anomalous"),
        ]
        eval_cmd = [
            *self.cli, "evaluate", "--model", str(model),
            "--good", str(split_dir / "test" / "good"),
            "--anomalous", str(split_dir / "test" / "anomalous"),
            "--format", "json",
        ]
        cal_cmd += VARIANT_CALIBRATE_ARGS.get(variant, [])
        if variant in VARIANT_CALIBRATE_ARGS:  # the default model, calibrated otherwise
            trained = self.variant(split_name, split_dir, "aadetect")
            shutil.copytree(Path(trained["run_dir"]) / "model", model)
            train_cmd, train_s = ["# copied from", str(Path(trained["run_dir"]) / "model")], trained["train_seconds"]
        else:
            _, train_s = _run(train_cmd, log_path, self.timeout)
        _, cal_s = _run(cal_cmd, log_path, self.timeout)
        proc, eval_s = _run(eval_cmd, log_path, self.timeout)
        ev = _parse_json_output(proc.stdout)
        (run_dir / "evaluate.json").write_text(json.dumps(ev, indent=1) + "\n")
        card = None  # the model card (card.yaml), kept in the results for the record
        if (model / "card.yaml").is_file():
            try:
                import yaml

                card = yaml.safe_load((model / "card.yaml").read_text())
            except Exception as exc:  # the card is a record, not a result: never fail on it
                card = {"unreadable": f"{type(exc).__name__}: {exc}"}
        out = {
            "evaluate": ev,
            "train_seconds": train_s,
            "calibrate_seconds": cal_s,
            "evaluate_seconds": eval_s,
            "commands": [shlex.join(c) for c in (train_cmd, cal_cmd, eval_cmd)],
            "run_dir": str(run_dir),
            "card": card,
        }
        self._done[key] = out
        return out

    def method(self, method: str, split_name: str, split_dir: Path) -> dict:
        if method == "aadetect-recon":
            r = self.variant(split_name, split_dir, "aadetect")
            ev = r["evaluate"]
            rec = ev["auroc"]["reconstruction"]
            by_signal = ev.get("balanced_accuracy_by_signal") or {}
            return {
                "auroc": {"combined": rec, "reconstruction": rec, "density": None},
                "auprc": {"combined": (ev.get("auprc") or {}).get("reconstruction")},
                "balanced_accuracy": by_signal.get("reconstruction"),
                "train_seconds": r["train_seconds"],
                "settings": {"note": "reconstruction error of the default aadetect model (reused run)",
                             "commands": r["commands"]},
                "evaluate": ev,
            }
        r = self.variant(split_name, split_dir, method)
        ev = r["evaluate"]
        return {
            "auroc": dict(ev["auroc"]),
            "auprc": ev.get("auprc"),
            "balanced_accuracy": ev.get("balanced_accuracy"),
            "f1": ev.get("f1"),
            "tpr": ev.get("tpr"),
            "fpr": ev.get("fpr"),
            "confusion": ev.get("confusion"),
            "train_seconds": r["train_seconds"],
            "calibrate_seconds": r["calibrate_seconds"],
            "evaluate_seconds": r["evaluate_seconds"],
            "settings": {"commands": r["commands"], "train_args": VARIANT_TRAIN_ARGS[method] + self.extra_train_args},
            "evaluate": ev,
            "card": r["card"],
        }


# ------------------------------------------------------------------------ peers


class SplitPixels:
    """The split's PNG folders read back as flattened float32 pixels in [0, 1]."""

    def __init__(self, split_dir: Path):
        def load(rel: str) -> np.ndarray:
            x, _ = D.read_png_folder(split_dir / rel)
            return x.reshape(len(x), -1).astype(np.float32) / 255.0

        self.train = load("train/good")
        self.cal_good = load("calibrate/good")
        self.cal_anomalous = load("calibrate/anomalous")
        self.test_good = load("test/good")
        self.test_anomalous = load("test/anomalous")


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def _score_peer(score_fn, px: SplitPixels, fit_s: float, settings: dict) -> dict:
    t0 = time.perf_counter()
    s_good, s_anom = score_fn(px.test_good), score_fn(px.test_anomalous)
    c_good, c_anom = score_fn(px.cal_good), score_fn(px.cal_anomalous)
    score_s = time.perf_counter() - t0
    thr = calibrate_threshold(c_good, c_anom)
    a = auroc(s_good, s_anom)
    tpr = float(np.mean(s_anom > thr))
    fpr = float(np.mean(s_good > thr))
    return {
        "auroc": {"combined": a, "reconstruction": None, "density": None},
        "balanced_accuracy": balanced_accuracy(s_good, s_anom, thr),
        "tpr": tpr,
        "fpr": fpr,
        "threshold": thr,
        "calibration_balanced_accuracy": balanced_accuracy(c_good, c_anom, thr),
        "train_seconds": fit_s,
        "score_seconds": score_s,
        "settings": settings,
    }


def peer_pca_kde(px: SplitPixels, seed: int, dims: int = PCA_DIMS) -> dict:
    from scipy.stats import gaussian_kde

    t0 = time.perf_counter()
    x = px.train.astype(np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    # right singular vectors of the centred data = singular vectors of its 784x784
    # scatter matrix; the small SVD is several times faster than the tall one
    _, _, vt = np.linalg.svd(xc.T @ xc)
    comps = vt[:dims]
    kde = gaussian_kde((xc @ comps.T).T)  # Scott's rule bandwidth
    fit_s = time.perf_counter() - t0

    def score(xx):
        return -kde.logpdf(((xx.astype(np.float64) - mean) @ comps.T).T)

    settings = {"pca_dims": dims, "pca": "numpy.linalg.svd of the scatter matrix of the mean-centred [0,1] pixels",
                "kde": "scipy.stats.gaussian_kde, bw_method=scott (default)", "score": "-logpdf",
                "deterministic": True}
    return _score_peer(score, px, fit_s, settings)


def _pyod_params(model) -> dict:
    params = {}
    for k, v in model.get_params().items():
        params[k] = v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)
    return params


def _fit_pyod(model, px: SplitPixels) -> dict:
    """Fit a PyOD detector on the flattened training pixels and score it like every peer."""
    t0 = time.perf_counter()
    model.fit(px.train)
    fit_s = time.perf_counter() - t0
    cls = type(model)
    settings = {"class": f"{cls.__module__}.{cls.__name__}", "params": _pyod_params(model),
                "input": "flattened pixels scaled to [0,1]", "score": "decision_function"}
    return _score_peer(model.decision_function, px, fit_s, settings)


def peer_pyod_ae(px: SplitPixels, seed: int, epochs: int | None = None) -> dict:
    from pyod.models.auto_encoder import AutoEncoder

    _seed_everything(seed)
    kw = {"random_state": seed, "verbose": 0}
    if epochs is not None:
        kw["epoch_num"] = epochs
    return _fit_pyod(AutoEncoder(**kw), px)  # PyOD defaults otherwise


def peer_pyod_deepsvdd(px: SplitPixels, seed: int, epochs: int | None = None) -> dict:
    from pyod.models.deep_svdd import DeepSVDD

    _seed_everything(seed)
    kw = {"n_features": px.train.shape[1], "random_state": seed, "verbose": 0}
    if epochs is not None:
        kw["epochs"] = epochs
    return _fit_pyod(DeepSVDD(**kw), px)  # PyOD defaults otherwise


# ------------------------------------------------------------------- reporting


def _f(x, nd=4) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _time_cell(row, budget) -> str:
    t = row.get("train_seconds")
    if t is None:
        return "–"
    return f"{t:.0f}" + (" ⚠" if budget and t > budget else "")


def markdown(results: dict) -> str:
    rows = [r for r in results["rows"]]
    methods = [m for m in results["settings"]["methods"] if any(r["method"] == m for r in rows)]
    splits = results["splits"]
    budget = results["settings"].get("max_train_seconds")
    protocol = results["settings"]["protocol"]
    dataset = results["settings"]["dataset"]
    by = {(r["split"], r["method"]): r for r in rows}
    lines = []

    def label(sp):
        if protocol == "oneclass":
            name = D.CLASS_NAMES[dataset][sp["normal_class"]] if dataset in D.CLASS_NAMES else ""
            return f"{sp['normal_class']}" + (f" ({name})" if name and name != str(sp["normal_class"]) else "")
        return f"α={sp['alpha']:g} ({sp['n_contamination']}/{sp['n_train']})"

    def ok(r):
        return r is not None and "error" not in r

    # 1) wide table: AUROC (combined) per split x method
    head = "class" if protocol == "oneclass" else "training set"
    lines.append(f"AUROC (combined score; peers: their one score) — {dataset}, {protocol}\n")
    lines.append(f"| {head} | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---:|" * len(methods))
    for sp in splits:
        cells = []
        for m in methods:
            r = by.get((sp["name"], m))
            cells.append("error" if r is not None and not ok(r) else _f(r["auroc"]["combined"] if ok(r) else None))
        lines.append(f"| {label(sp)} | " + " | ".join(cells) + " |")
    means = []
    for m in methods:
        vals = [by[(sp["name"], m)]["auroc"]["combined"] for sp in splits if ok(by.get((sp["name"], m)))]
        n_missing = len(splits) - len(vals)
        means.append(f"**{_f(_mean(vals))}**" + (f" ({len(vals)}/{len(splits)})" if n_missing else ""))
    lines.append("| **mean** | " + " | ".join(means) + " |")

    # 2) detail table
    lines.append("")
    lines.append(f"Per {head}: AUROC (combined / reconstruction / density), balanced accuracy at the "
                 "calibrated thresholds, train seconds" + (f" (⚠ = over {budget:g} s)" if budget else ""))
    lines.append("")
    lines.append(f"| {head} | method | AUROC comb. | AUROC recon. | AUROC density | bal. acc. | train s |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for sp in splits:
        for m in methods:
            r = by.get((sp["name"], m))
            if r is None:
                continue
            if not ok(r):
                lines.append(f"| {label(sp)} | {m} | error: {r['error'][:60]} | | | | |")
                continue
            au = r["auroc"]
            lines.append(
                f"| {label(sp)} | {m} | {_f(au.get('combined'))} | {_f(au.get('reconstruction'))} | "
                f"{_f(au.get('density'))} | {_f(r.get('balanced_accuracy'))} | {_time_cell(r, budget)} |"
            )

    # 3) summary per method
    lines.append("")
    lines.append("Mean per method")
    lines.append("")
    lines.append("| method | splits | AUROC comb. | AUROC recon. | AUROC density | bal. acc. | train s (mean) | train s (max) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in methods:
        rs = [by[(sp["name"], m)] for sp in splits if ok(by.get((sp["name"], m)))]
        if not rs:
            continue
        ts = [r.get("train_seconds") for r in rs if r.get("train_seconds") is not None]
        lines.append(
            f"| {m} | {len(rs)}/{len(splits)} | {_f(_mean([r['auroc'].get('combined') for r in rs]))} | "
            f"{_f(_mean([r['auroc'].get('reconstruction') for r in rs]))} | "
            f"{_f(_mean([r['auroc'].get('density') for r in rs]))} | "
            f"{_f(_mean([r.get('balanced_accuracy') for r in rs]))} | "
            f"{_f(_mean(ts), 1)} | {_f(max(ts) if ts else None, 1)} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ main


def build_splits(args, ds) -> list[dict]:
    splits = []
    root = args.workdir / "splits"
    if args.protocol == "oneclass":
        for k in args.classes:
            name = D.oneclass_split_name(args.dataset, k, args.seed)
            splits.append({"name": name, "dir": root / name, "normal_class": k,
                           "write": lambda k=k, d=root / name: D.write_oneclass_split(
                               ds, k, d, seed=args.seed, n_cal=args.n_cal)})
    else:
        cfg = CONTAMINATION_DEFAULTS[args.dataset]
        normal = args.normal_class if args.normal_class is not None else cfg["normal"]
        anomaly = args.anomaly_class if args.anomaly_class is not None else cfg["anomaly"]
        alphas = args.alphas if args.alphas is not None else cfg["alphas"]
        for a in alphas:
            name = D.contamination_split_name(args.dataset, normal, anomaly, a, args.seed)
            splits.append({"name": name, "dir": root / name, "normal_class": normal, "anomaly_class": anomaly,
                           "alpha": a,
                           "write": lambda a=a, d=root / name: D.write_contamination_split(
                               ds, normal, anomaly, a, d, seed=args.seed, n_cal=args.n_cal)})
    return splits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=D.DATASETS, required=True)
    p.add_argument("--protocol", choices=("oneclass", "contamination"), default="oneclass")
    p.add_argument("--classes", default="all", help="comma list of normal classes (oneclass protocol); default all")
    p.add_argument("--methods", default=None,
                   help=f"comma list from {','.join(ALL_METHODS)}; 'peers' = {','.join(PEER_METHODS)}; "
                        "default: all for the protocol")
    p.add_argument("--alphas", default=None, help="contamination fractions, comma list (default per dataset: "
                   "mnist 0,0.01,0.05; fashion 0.01)")
    p.add_argument("--normal-class", type=int, default=None, help="contamination protocol: normal class (default 0)")
    p.add_argument("--anomaly-class", type=int, default=None, help="contamination protocol: polluting class (default 2)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("AADETECT_BENCH_CACHE", HERE / "cache")),
                   help="where fetch_data.sh put the data (default benchmarks/cache or $AADETECT_BENCH_CACHE)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where splits and models go (default CACHE/work)")
    p.add_argument("--results-dir", type=Path, default=HERE / "runs", help="JSON/markdown results (default benchmarks/runs)")
    p.add_argument("--out", type=Path, default=None, help="results JSON path (default RESULTS_DIR/DATASET-PROTOCOL-TIME.json)")
    p.add_argument("--resume", type=Path, default=None, help="continue a results JSON: skip rows already done")
    p.add_argument("--seed", type=int, default=0, help="split selection and training seed (default 0)")
    p.add_argument("--n-cal", type=int, default=10, help="calibration images per side (default 10)")
    p.add_argument("--max-train-seconds", type=float, default=180.0,
                   help="training-time budget per class; longer runs are flagged ⚠ (default 180)")
    p.add_argument("--timeout", type=float, default=1800.0, help="kill a CLI command after this many seconds")
    p.add_argument("--aadetect", default=None, help="command that runs the CLI (default: the venv's aadetect)")
    p.add_argument("--train-args", default="", help="extra arguments for every `aadetect train` (quoted string)")
    p.add_argument("--ae-epochs", type=int, default=None, help="PyOD AutoEncoder epoch_num (default: PyOD's, 10)")
    p.add_argument("--svdd-epochs", type=int, default=SVDD_EPOCHS,
                   help=f"PyOD DeepSVDD epochs (default {SVDD_EPOCHS}; PyOD's own default is 100)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the PyOD peers (default: torch's)")
    p.add_argument("--delete-splits", action="store_true", help="remove each split folder after use")
    args = p.parse_args(argv)

    if args.methods in (None, "", "all"):
        methods = list(DEFAULT_METHODS[args.protocol])
    else:
        methods = []
        for m in args.methods.split(","):
            m = m.strip()
            expand = list(PEER_METHODS) if m == "peers" else [m]
            for mm in expand:
                if mm not in ALL_METHODS:
                    p.error(f"unknown method {mm!r}; choose from {', '.join(ALL_METHODS)}")
                if mm not in methods:
                    methods.append(mm)
    args.methods = methods
    if args.classes in ("all", ""):
        args.classes = list(range(10))
    else:
        args.classes = [int(c) for c in args.classes.split(",")]
    if args.alphas is not None:
        args.alphas = [float(a) for a in args.alphas.split(",")]
    if args.workdir is None:
        args.workdir = args.cache / "work"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    ds = D.load_dataset(args.dataset, args.cache)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.resume:
        out_path = args.resume
        results = json.loads(out_path.read_text())
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_path = args.out or args.results_dir / f"{args.dataset}-{args.protocol}-{stamp}.json"
        results = {"rows": []}
    if args.resume:
        old = results["settings"]
        for key, val in (("dataset", args.dataset), ("protocol", args.protocol), ("seed", args.seed),
                         ("n_cal", args.n_cal), ("train_args", args.train_args),
                         ("ae_epochs", args.ae_epochs), ("svdd_epochs", args.svdd_epochs)):
            if old.get(key) != val:
                sys.exit(f"--resume {out_path}: {key} was {old.get(key)!r} there, {val!r} now; start a new file")
        old["methods"] = list(dict.fromkeys(old["methods"] + args.methods))
    else:
        results["settings"] = {
            "dataset": args.dataset, "protocol": args.protocol, "methods": args.methods,
            "seed": args.seed, "n_cal": args.n_cal, "max_train_seconds": args.max_train_seconds,
            "train_args": args.train_args, "ae_epochs": args.ae_epochs, "svdd_epochs": args.svdd_epochs,
            "threads": args.threads,
        }
    results.setdefault("invocations", []).append({
        "command": shlex.join([sys.executable, str(Path(__file__).relative_to(REPO)
                                                   if Path(__file__).is_relative_to(REPO) else __file__), *argv_used]),
        "environment": environment(),
    })
    results["environment"] = results["invocations"][0]["environment"]
    done = {(r["split"], r["method"]) for r in results["rows"] if "error" not in r}
    results["rows"] = [r for r in results["rows"] if "error" not in r]

    cli = None
    runner = None
    if any(m in AADETECT_METHODS for m in args.methods):
        cli = find_cli(args.aadetect)
        runner = AadetectRunner(cli, args.workdir, args.seed, args.timeout, shlex.split(args.train_args))
        results["settings"]["cli"] = cli

    splits = build_splits(args, ds)
    split_meta = {sp["name"]: sp for sp in results.get("splits", [])}

    def save():
        results["splits"] = list(split_meta.values())
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(out_path)

    log(f"results -> {out_path}")
    t_all = time.perf_counter()
    for sp in splits:
        todo = [m for m in args.methods if (sp["name"], m) not in done]
        if not todo:
            log(f"{sp['name']}: all methods done, skipping")
            continue
        t0 = time.perf_counter()
        manifest = sp["write"]()
        log(f"{sp['name']}: split ready in {time.perf_counter() - t0:.1f}s: {manifest['counts']}")
        meta = {k: v for k, v in sp.items() if k not in ("write", "dir")}
        meta.update({"dir": str(sp["dir"]), "counts": manifest["counts"],
                     "n_train": manifest["counts"]["train/good"],
                     "n_contamination": manifest["counts"]["train/good (contamination)"],
                     "contamination_fraction": manifest["contamination_fraction"]})
        split_meta[sp["name"]] = meta
        px = None
        for m in todo:
            log(f"{sp['name']}: {m} ...")
            t_m = time.perf_counter()
            try:
                if m in AADETECT_METHODS:
                    row = runner.method(m, sp["name"], sp["dir"])
                else:
                    if px is None:
                        px = SplitPixels(sp["dir"])
                    if m == "pca-kde":
                        row = peer_pca_kde(px, args.seed)
                    elif m == "pyod-ae":
                        row = peer_pyod_ae(px, args.seed, args.ae_epochs)
                    else:
                        row = peer_pyod_deepsvdd(px, args.seed, args.svdd_epochs)
            except Exception as exc:  # keep going: one failure must not lose the run
                row = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{sp['name']}: {m} FAILED: {row['error']}")
            row.update({"split": sp["name"], "method": m, "wall_seconds": time.perf_counter() - t_m,
                        "loadavg_1min_after": os.getloadavg()[0]})
            if "error" not in row:
                log(f"{sp['name']}: {m}: AUROC {_f(row['auroc']['combined'])}, "
                    f"bal.acc {_f(row.get('balanced_accuracy'))}, train {row.get('train_seconds', 0):.1f}s")
            results["rows"] = [r for r in results["rows"] if (r["split"], r["method"]) != (sp["name"], m)]
            results["rows"].append(row)
            save()
        if args.delete_splits:
            shutil.rmtree(sp["dir"], ignore_errors=True)
    results["total_seconds_last_invocation"] = time.perf_counter() - t_all
    # keep the splits in the requested order for the tables
    order = [sp["name"] for sp in splits]
    results["splits"] = sorted(split_meta.values(), key=lambda s: order.index(s["name"]) if s["name"] in order else 1e9)
    split_meta = {s["name"]: s for s in results["splits"]}
    save()
    md = markdown(results)
    out_path.with_suffix(".md").write_text(md)
    print(md)
    log(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    n_err = sum(1 for r in results["rows"] if "error" in r)
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
