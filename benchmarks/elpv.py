"""Real-defect benchmark: monocrystalline solar cells of ELPV (issue 26).

MNIST-style one-class splits say little about real defects, so this one uses the
ELPV electroluminescence cells (Deitsch et al., 2019; PyPI ``elpv-dataset``,
fetched by benchmarks/fetch_elpv.sh). Each 300x300 cell carries an expert defect
probability of 0, 1/3, 2/3 or 1. Only the monocrystalline cells are used: the
polycrystalline ones are kept for an independent check of whether the design
generalises, so nothing is ever tuned on them.

The split (``--seed``, default 0), written as PNG folders under
WORKDIR/splits/elpv-mono-s0/ (a ``.partial`` folder, then renamed):

    train/good/           70% of the probability-0 cells
    calibrate/good/       10 further probability-0 cells
    calibrate/anomalous/  10 probability-1 cells
    test/good/            the remaining probability-0 cells
    test/anomalous/       the remaining probability-1 cells
    test/anomalous-067/   those and every probability-2/3 cell ("probability >= 0.67")
    split.json            parameters, file names per folder, counts

Each group is sorted by file name, then shuffled with one seeded permutation;
the cells keep their size and file name (aadetect resizes itself).

Every method is scored on both test sets (test/good against each anomalous set)
and the results go to a JSON file under benchmarks/runs/, rewritten after each
method, so a run that dies keeps what it measured (``--resume FILE`` goes on).

Methods
  aadetect        aadetect train (defaults: 128 px, a 16x16 code grid) / calibrate / evaluate --format json,
                  through the CLI
  aadetect-adv    ``train --adversarial``: the adversarial prior on every local code
  aadetect-mse    ``train --error mse``
  aadetect-global ``train --image-size 64 --code-grid 1``: one code per image at 64 px (the design for
                  small images)
  pca-kde         PCA (numpy SVD) of the raw 128 px pixels to 32 dims + scipy gaussian_kde
  conv-ae-kde     a plain conv autoencoder at 128 px (16x16x16 latent), PCA 16 of the
                  latent + gaussian_kde
  pyod-ae         PyOD AutoEncoder (PyOD defaults) on the flattened 128 px pixels
  pyod-deepsvdd   PyOD DeepSVDD on the flattened 128 px pixels, 20 epochs as in oneclass.py

Peers see the cells resized to 128x128 (Pillow bilinear, /255); their score is
-logpdf or PyOD's decision_function, and their balanced accuracy is taken at the
threshold that does best on the 10+10 calibration cells (oneclass.py's rule);
aadetect's is at the thresholds its own ``calibrate`` chose on the same cells.
AUROC is aadetect.metrics.auroc for every method.

anomalib is left out. anomalib 2.7.0 would need an environment of its own: pip
resolves it to 94 packages (lightning, timm, kornia, opencv, FrEIA, scikit-image,
matplotlib, pandas, torchmetrics, torch with its CUDA libraries). Its DRAEM
downloads the DTD texture set from robots.ox.ac.uk when built (unreachable here,
where only package registries are; an empty folder instead gives Perlin-noise
anomalies, not DRAEM), and GANomaly and DRAEM from scratch took ~14 min each on 2
CPU cores in issue 26, against 2-5 min for any method here.

Example
  benchmarks/fetch_elpv.sh
  python benchmarks/elpv.py
  python benchmarks/elpv.py --methods pca-kde,conv-ae-kde
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aadetect.metrics import auroc  # noqa: E402
from benchmarks import datasets as D  # noqa: E402
from benchmarks import oneclass as O  # noqa: E402

#: Bump when the selection rule changes so that cached split folders are rewritten.
SPLIT_FORMAT = 1
TRAIN_FRACTION = 0.7
N_CAL = 10
TEST_SETS = {"p1": "test/anomalous", "p067": "test/anomalous-067"}
TEST_TITLES = {"p1": "probability 1", "p067": "probability >= 0.67"}

VARIANT_TRAIN_ARGS = {
    "aadetect": [],
    "aadetect-adv": ["--adversarial"],
    "aadetect-mse": ["--error", "mse"],
    "aadetect-global": ["--image-size", "64", "--code-grid", "1"],
}
PEER_METHODS = ("pca-kde", "conv-ae-kde", "pyod-ae", "pyod-deepsvdd")
ALL_METHODS = tuple(VARIANT_TRAIN_ARGS) + PEER_METHODS

PEER_SIZE = 128
PCA_DIMS = 32
AE_PCA_DIMS = 16
# ~3 min of training on 2 busy cores; the training loss has flattened by then (0.0005 MSE)
AE_EPOCHS = 20
AE_BATCH = 32


def log(msg: str) -> None:
    print(f"[elpv {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- split


def read_labels(elpv_dir: Path) -> list[tuple[str, float, str]]:
    """labels.csv rows as (image path, defect probability, cell type)."""
    rows = []
    for line in (elpv_dir / "labels.csv").read_text().splitlines():
        if line.strip():
            path, prob, kind = line.split()
            rows.append((path, float(prob), kind))
    return rows


def select(labels, seed: int, cell_type: str = "mono") -> dict[str, list[str]]:
    """Image paths per split folder, from the cells of one type (mono: the tuning set; poly: the check)."""
    cells = [(path, p) for path, p, kind in labels if kind == cell_type]
    good = sorted(path for path, p in cells if p == 0)
    defective = sorted(path for path, p in cells if p == 1)
    probable = sorted(path for path, p in cells if 2 / 3 - 1e-6 < p < 1)  # stored as 0.666...
    rng = np.random.default_rng([seed, SPLIT_FORMAT])
    good = [good[i] for i in rng.permutation(len(good))]
    defective = [defective[i] for i in rng.permutation(len(defective))]
    n_train = int(round(TRAIN_FRACTION * len(good)))
    folders = {
        "train/good": good[:n_train],
        "calibrate/good": good[n_train:n_train + N_CAL],
        "calibrate/anomalous": defective[:N_CAL],
        "test/good": good[n_train + N_CAL:],
        "test/anomalous": defective[N_CAL:],
        "test/anomalous-067": defective[N_CAL:] + probable,
    }
    return {k: sorted(v) for k, v in folders.items()}


def write_split(elpv_dir: Path, out_dir: Path, seed: int, cell_type: str = "mono") -> dict:
    """Write the split folders (reusing a complete one with the same parameters); returns the manifest."""
    params = {"dataset": "elpv", "source": (elpv_dir / "SOURCE").read_text().strip(), "type": cell_type,
              "seed": seed, "train_fraction": TRAIN_FRACTION, "n_cal": N_CAL, "format": SPLIT_FORMAT}
    manifest_path = out_dir / "split.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("params") == params and old.get("complete"):
            return old
    folders = select(read_labels(elpv_dir), seed, cell_type)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for folder, paths in folders.items():
        (tmp / folder).mkdir(parents=True)
        for path in paths:
            with Image.open(elpv_dir / path) as im:
                pixels = np.asarray(im.convert("L"))
            (tmp / folder / Path(path).name).write_bytes(D.png_bytes(pixels))  # no gamma or other chunks
    manifest = {"params": params, "counts": {k: len(v) for k, v in folders.items()},
                "files": folders, "complete": True}
    (tmp / "split.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return manifest


# -------------------------------------------------------------------- aadetect


def run_aadetect(method: str, cli: list[str], split_dir: Path, work: Path, seed: int, timeout: float) -> dict:
    """train -> calibrate -> evaluate (once per test set) through the real CLI."""
    run_dir = work / "models" / split_dir.name / method
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    model, log_path = run_dir / "model", run_dir / "commands.log"
    train = [*cli, "train", str(split_dir / "train/good"), "--out", str(model), "--seed", str(seed), "--quiet",
             *VARIANT_TRAIN_ARGS[method]]
    calibrate = [*cli, "calibrate", "--model", str(model), "--good", str(split_dir / "calibrate/good"),
                 "--anomalous", str(split_dir / "calibrate/anomalous")]
    _, train_s = O._run(train, log_path, timeout)
    _, cal_s = O._run(calibrate, log_path, timeout)
    commands, tests, evaluated = [train, calibrate], {}, {}
    for test, folder in TEST_SETS.items():
        evaluate = [*cli, "evaluate", "--model", str(model), "--good", str(split_dir / "test/good"),
                    "--anomalous", str(split_dir / folder), "--format", "json"]
        proc, _ = O._run(evaluate, log_path, timeout)
        ev = evaluated[test] = O._parse_json_output(proc.stdout)
        commands.append(evaluate)
        tests[test] = {"auroc": {k: ev["auroc"][k] for k in ("combined", "reconstruction", "density")},
                       "balanced_accuracy": ev["balanced_accuracy"], "tpr": ev["tpr"], "fpr": ev["fpr"],
                       "n_good": ev["n_good"], "n_anomalous": ev["n_anomalous"]}
    return {"tests": tests, "train_seconds": train_s, "calibrate_seconds": cal_s,
            "settings": {"train_args": VARIANT_TRAIN_ARGS[method], "commands": [shlex.join(c) for c in commands],
                         "run_dir": str(run_dir)},
            "evaluate": evaluated}


# ----------------------------------------------------------------------- peers


class Pixels:
    """The split's folders read back at 128x128 (Pillow bilinear), flattened, in [0, 1]."""

    def __init__(self, split_dir: Path):
        def load(folder: str) -> np.ndarray:
            out = []
            for path in sorted((split_dir / folder).glob("*.png")):
                with Image.open(path) as im:
                    small = im.convert("L").resize((PEER_SIZE, PEER_SIZE), Image.BILINEAR)
                out.append(np.asarray(small, dtype=np.float32).ravel() / 255.0)
            return np.stack(out)

        self.train = load("train/good")
        self.cal_good, self.cal_anomalous = load("calibrate/good"), load("calibrate/anomalous")
        self.test_good = load("test/good")
        self.test_anomalous = {test: load(folder) for test, folder in TEST_SETS.items()}


def pca(x: np.ndarray, dims: int):
    """Mean and top principal axes of the rows of x (thin SVD: far fewer rows than columns)."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dims]


def kde_score(train_feats: np.ndarray, dims: int):
    """-log density under a Gaussian KDE (Scott's bandwidth) of the PCA-reduced training features."""
    from scipy.stats import gaussian_kde

    mean, axes = pca(train_feats.astype(np.float64), dims)
    kde = gaussian_kde(((train_feats - mean) @ axes.T).T)
    return lambda feats: -kde.logpdf(((feats.astype(np.float64) - mean) @ axes.T).T)


def fit_pca_kde(px: Pixels, seed: int, args):
    t0 = time.perf_counter()
    score = kde_score(px.train, PCA_DIMS)
    settings = {"input": f"{PEER_SIZE} px pixels in [0,1]", "pca_dims": PCA_DIMS,
                "kde": "scipy.stats.gaussian_kde, Scott's rule", "score": "-logpdf"}
    return score, time.perf_counter() - t0, settings


def fit_conv_ae_kde(px: Pixels, seed: int, args):
    """A textbook conv autoencoder; its spatial code, PCA-reduced, goes into a KDE."""
    import torch
    from torch import nn

    O._seed_everything(seed)
    encoder = nn.Sequential(  # 1x128x128 -> 32x64x64 -> 64x32x32 -> 16x16x16
        nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, 16, 4, 2, 1))
    decoder = nn.Sequential(
        nn.ConvTranspose2d(16, 64, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid())
    model = nn.Sequential(encoder, decoder)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def images(x):
        return torch.from_numpy(x).view(-1, 1, PEER_SIZE, PEER_SIZE)

    t0 = time.perf_counter()
    x, order = images(px.train), torch.Generator().manual_seed(seed)
    for _ in range(args.ae_epochs):
        for batch in torch.randperm(len(x), generator=order).split(AE_BATCH):
            loss = nn.functional.mse_loss(model(x[batch]), x[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    @torch.no_grad()
    def codes(xx):
        return torch.cat([encoder(b).flatten(1) for b in images(xx).split(64)]).numpy()

    kde = kde_score(codes(px.train), AE_PCA_DIMS)
    settings = {"input": f"{PEER_SIZE} px pixels in [0,1]", "latent": "16x16x16", "epochs": args.ae_epochs,
                "batch": AE_BATCH, "optimiser": "Adam lr 1e-3", "loss": "MSE", "pca_dims": AE_PCA_DIMS,
                "final_train_loss": loss.item(), "score": "-logpdf of the PCA-reduced code"}
    return (lambda xx: kde(codes(xx))), time.perf_counter() - t0, settings


def _fit_pyod(model, px: Pixels):
    t0 = time.perf_counter()
    model.fit(px.train)
    cls = type(model)
    settings = {"class": f"{cls.__module__}.{cls.__name__}", "params": O._pyod_params(model),
                "input": f"flattened {PEER_SIZE} px pixels in [0,1]", "score": "decision_function"}
    return model.decision_function, time.perf_counter() - t0, settings


def fit_pyod_ae(px: Pixels, seed: int, args):
    from pyod.models.auto_encoder import AutoEncoder

    O._seed_everything(seed)
    return _fit_pyod(AutoEncoder(random_state=seed, verbose=0), px)


def fit_pyod_deepsvdd(px: Pixels, seed: int, args):
    from pyod.models.deep_svdd import DeepSVDD

    O._seed_everything(seed)
    return _fit_pyod(DeepSVDD(n_features=px.train.shape[1], random_state=seed, verbose=0,
                              epochs=args.svdd_epochs), px)


PEER_FITS = {"pca-kde": fit_pca_kde, "conv-ae-kde": fit_conv_ae_kde,
             "pyod-ae": fit_pyod_ae, "pyod-deepsvdd": fit_pyod_deepsvdd}


def run_peer(method: str, px: Pixels, seed: int, args) -> dict:
    score, fit_s, settings = PEER_FITS[method](px, seed, args)
    threshold = O.calibrate_threshold(score(px.cal_good), score(px.cal_anomalous))
    good = score(px.test_good)
    tests = {}
    for test, anomalous in px.test_anomalous.items():
        bad = score(anomalous)
        tests[test] = {"auroc": {"combined": auroc(good, bad), "reconstruction": None, "density": None},
                       "balanced_accuracy": O.balanced_accuracy(good, bad, threshold),
                       "tpr": float(np.mean(bad > threshold)), "fpr": float(np.mean(good > threshold)),
                       "n_good": len(good), "n_anomalous": len(bad)}
    return {"tests": tests, "train_seconds": fit_s, "threshold": threshold, "settings": settings}


# ------------------------------------------------------------------- reporting


def markdown(results: dict) -> str:
    counts = results["split"]["counts"]
    cell_type = {"mono": "monocrystalline", "poly": "polycrystalline"}[results["settings"].get("cell_type", "mono")]
    lines = [f"ELPV {cell_type} cells, seed {results['settings']['seed']}: "
             f"train {counts['train/good']} good, calibrate {counts['calibrate/good']}+"
             f"{counts['calibrate/anomalous']}, test {counts['test/good']} good vs "
             f"{counts['test/anomalous']} (probability 1) / {counts['test/anomalous-067']} (probability >= 0.67)"]
    for test, title in TEST_TITLES.items():
        lines += ["", f"Test: good vs {title} ({counts[TEST_SETS[test]]} cells)", "",
                  "| method | AUROC comb. | AUROC recon. | AUROC density | bal. acc. | train s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in results["rows"]:
            if "error" in row:
                lines.append(f"| {row['method']} | error: {row['error'][:80]} | | | | |")
                continue
            t = row["tests"][test]
            au = t["auroc"]
            lines.append(f"| {row['method']} | {O._f(au['combined'])} | {O._f(au['reconstruction'])} | "
                         f"{O._f(au['density'])} | {O._f(t['balanced_accuracy'])} | {row['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all", help=f"comma list from {','.join(ALL_METHODS)} (default all)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("AADETECT_BENCH_CACHE", HERE / "cache")),
                   help="where fetch_elpv.sh put elpv/ (default benchmarks/cache or $AADETECT_BENCH_CACHE)")
    p.add_argument("--workdir", type=Path, default=None, help="where splits and models go (default CACHE/work)")
    p.add_argument("--results-dir", type=Path, default=HERE / "runs", help="results (default benchmarks/runs)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default RESULTS_DIR/elpv-mono-TIME.json)")
    p.add_argument("--resume", type=Path, default=None, help="continue a results JSON: skip methods already done")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    p.add_argument("--cell-type", choices=("mono", "poly"), default="mono",
                   help="mono (default): the cells designs are tuned on; poly: the independent check, the same "
                        "split rule on the polycrystalline cells (never tune on it)")
    p.add_argument("--ae-epochs", type=int, default=AE_EPOCHS, help=f"conv-ae-kde epochs (default {AE_EPOCHS})")
    p.add_argument("--svdd-epochs", type=int, default=O.SVDD_EPOCHS,
                   help=f"PyOD DeepSVDD epochs (default {O.SVDD_EPOCHS}, as oneclass.py)")
    p.add_argument("--timeout", type=float, default=1800.0, help="kill a CLI command after this many seconds")
    p.add_argument("--aadetect", default=None, help="command that runs the CLI (default: the venv's aadetect)")
    args = p.parse_args(argv)
    args.methods = list(ALL_METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    for m in args.methods:
        if m not in ALL_METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    args.workdir = args.workdir or args.cache / "work"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    elpv_dir = args.cache / "elpv"
    if not (elpv_dir / "labels.csv").is_file():
        sys.exit(f"no ELPV data in {elpv_dir}: run benchmarks/fetch_elpv.sh first")
    settings = {"seed": args.seed, "ae_epochs": args.ae_epochs, "svdd_epochs": args.svdd_epochs,
                "cell_type": args.cell_type}
    if args.resume:
        out_path, results = args.resume, json.loads(args.resume.read_text())
        if results["settings"] != settings:
            sys.exit(f"--resume {out_path}: settings were {results['settings']}, now {settings}; start a new file")
        results["rows"] = [r for r in results["rows"] if "error" not in r]
    else:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        out_path = args.out or args.results_dir / f"elpv-{args.cell_type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        results = {"settings": settings, "rows": []}
    argv_used = sys.argv[1:] if argv is None else list(argv)
    results.setdefault("invocations", []).append(
        {"command": shlex.join([sys.executable, str(Path(__file__).relative_to(REPO)), *argv_used]),
         "environment": O.environment()})

    def save():
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(out_path)

    split_dir = args.workdir / "splits" / f"elpv-{args.cell_type}-s{args.seed}"
    manifest = write_split(elpv_dir, split_dir, args.seed, args.cell_type)
    results["split"] = {"dir": str(split_dir), "params": manifest["params"], "counts": manifest["counts"]}
    log(f"split {split_dir}: {manifest['counts']}; results -> {out_path}")
    done = {r["method"] for r in results["rows"]}
    cli, px = O.find_cli(args.aadetect), None
    for m in [m for m in args.methods if m not in done]:
        log(f"{m} ...")
        t0 = time.perf_counter()
        try:
            if m in VARIANT_TRAIN_ARGS:
                row = run_aadetect(m, cli, split_dir, args.workdir, args.seed, args.timeout)
            else:
                if px is None:
                    px = Pixels(split_dir)
                row = run_peer(m, px, args.seed, args)
        except Exception as exc:  # keep going: one failure must not lose the run
            row = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{m} FAILED: {row['error']}")
        row.update({"method": m, "wall_seconds": time.perf_counter() - t0, "loadavg_1min_after": os.getloadavg()[0]})
        if "error" not in row:
            log(f"{m}: AUROC {' / '.join(O._f(t['auroc']['combined']) for t in row['tests'].values())}, "
                f"train {row['train_seconds']:.0f}s")
        results["rows"].append(row)
        save()
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    results["rows"].sort(key=lambda r: order[r["method"]])
    save()
    md = markdown(results)
    out_path.with_suffix(".md").write_text(md)
    print(md)
    log(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    return 1 if any("error" in r for r in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
