"""The command line: parse options, call the library, print data on stdout and everything else on stderr.

Heavy imports (torch, scipy, the library modules that need them) happen inside the
commands, so that `aadetect --help` and `aadetect --version` start instantly.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from aadetect import __version__
from aadetect.config import CODE_RADII, ERROR_MEASURES, OBJECTIVES, TrainConfig
from aadetect.demo import DEMO_EPOCHS, DEMO_TRAIN_IMAGES
from aadetect.errors import UserError, first_line

app = typer.Typer(
    name="aadetect",
    help="Find anomalous images with an autoencoder (optionally adversarial) and a latent-space density.\n\n"
         "Typical use: `aadetect train ./good`, then `aadetect calibrate --good G --anomalous A`, "
         "then `aadetect score img.png`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_MODEL = "aadetect-model"
EXIT_ANOMALY, EXIT_USAGE, EXIT_BUG = 1, 2, 3
EXIT_READER_LEFT = 128 + 13  # what a shell reports for a process ended by SIGPIPE
MESSAGE_LIMIT = 400  # characters of an error line: a message naming thousands of entries is cut
MAX_PATH_BYTES = 1 << 16  # a longer line on stdin is not a path
SCORE_CHUNK = 4096  # inputs scored at a time
SCORE_FIELDS = ("path", "reconstruction_error", "log_density", "anomaly_log_odds", "score", "anomaly", "reason",
                "peak_x", "peak_y", "heatmap", "error")


class ScoreFormat(str, Enum):
    table = "table"
    jsonl = "jsonl"
    csv = "csv"


class ReportFormat(str, Enum):
    table = "table"
    json = "json"


class Engine(str, Enum):
    torch = "torch"
    onnx = "onnx"


ErrorMeasure = Enum("ErrorMeasure", {measure: measure for measure in ERROR_MEASURES}, type=str)
CodeRadius = Enum("CodeRadius", {radius: radius for radius in CODE_RADII}, type=str)
Objective = Enum("Objective", {objective: objective for objective in OBJECTIVES}, type=str)


ModelOption = Annotated[Path, typer.Option("--model", "-m", envvar="AADETECT_MODEL",
                                           help="Model folder written by `train` (env: AADETECT_MODEL).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto picks CUDA when present.")]
GoodOption = Annotated[Path, typer.Option(help="Folder of labelled good images.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")]


def examples(*lines: str) -> str:
    """The end of a command's --help: a few commands to copy."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


def say(message: str) -> None:
    """Human-facing text goes to stderr; stdout carries data only."""
    typer.echo(message, err=True)


def user_errors(command):
    """Turn the user's mistakes into one line on stderr and an exit code, never a traceback."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            say(f"aadetect: error: {first_line(error, MESSAGE_LIMIT)}")
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            say("aadetect: interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # e.g. `aadetect score ... | head`: the reader left, stop quietly
            discard_stdout()
            raise typer.Exit(EXIT_READER_LEFT) from None  # not 1: unread images are not "anomalous"
        except OSError as error:  # a full disk, a read-only --out folder: the user's to fix, not a bug
            if error.filename is None and stdout_write_error() is not None:
                say(f"aadetect: error: standard output: {error.strerror or error}")
            else:
                say(f"aadetect: error: {error.filename or ''}{': ' if error.filename else ''}"
                    f"{error.strerror or error}")
            raise typer.Exit(EXIT_USAGE) from None
        except (typer.Exit, typer.Abort):
            raise  # how a command ends on purpose
        except Exception:  # a bug: keep the traceback for the report, but never exit 1 ("anomalous")
            import traceback

            traceback.print_exc()
            say("aadetect: internal error (a bug in aadetect; please report it with the traceback above)")
            raise typer.Exit(EXIT_BUG) from None
    return run


@contextmanager
def report_of_a_change() -> Iterator[None]:
    """What a command prints about a change it has made: the change stands whatever becomes of the report
    (a full disk, a reader that left), so failing to write it is a warning, and the exit stays 0."""
    try:
        yield
        sys.stdout.flush()
    except OSError as error:  # BrokenPipeError too
        discard_stdout()
        say(f"aadetect: warning: the model was written, but its report could not be (standard output: "
            f"{error.strerror or error})")


def discard_stdout() -> None:
    """Point stdout at /dev/null, so that what is still buffered for a reader that left (or a full
    disk) does not fail again, with a traceback, in Python's final flush."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def stdout_write_error() -> OSError | None:
    """Why stdout cannot take what was written to it (/dev/full, a broken pipe), or None."""
    try:
        sys.stdout.flush()
    except OSError as error:
        discard_stdout()
        return error
    return None


def reporter_for(quiet: bool):
    from aadetect.progress import ConsoleReporter

    return ConsoleReporter(quiet=quiet)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"aadetect {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Find anomalous images with an autoencoder and a latent-space density."""


@app.command(epilog=examples(
    "aadetect train ./good                      # writes ./aadetect-model",
    "aadetect train ./good --out parts-model --epochs 40 --device cuda"))
@user_errors
def train(
    data: Annotated[Path, typer.Argument(help="Folder of good images (png, jpg, bmp, tif; searched recursively), "
                                              "or a .npy/.npz array shaped (N,H,W) or (N,H,W,C).")],
    out: Annotated[Path, typer.Option("--out", "-o", envvar="AADETECT_MODEL",
                                      help="Model folder to write (env: AADETECT_MODEL).")] = Path(DEFAULT_MODEL),
    epochs: Annotated[int, typer.Option(help="Most training epochs (early stopping may end sooner); 0 = auto: 20, "
                                             "or 28 for a code grid.")
                      ] = TrainConfig.epochs,
    image_size: Annotated[int, typer.Option(help="Side in pixels the images are resized to; 0 = auto: the "
                                                 "images' own size (to a multiple of 4) up to 32, 64 up to 127, "
                                                 "else 128.")] = TrainConfig.image_size,
    code_grid: Annotated[int, typer.Option(help="Codes per image side: 1, one code for the whole image; N (a "
                                                "power of 2), one code per neighbourhood, each with a density "
                                                "of its own; 0 = auto: 1 below 128 px, else one per 8x8 pixels.")
                         ] = TrainConfig.code_grid,
    latent_dim: Annotated[int, typer.Option(help="Numbers in each code; 0 = auto: 32 for one code per image, "
                                                 "8 for a code grid.")] = TrainConfig.latent_dim,
    batch_size: Annotated[int, typer.Option(help="Images per training step; 0 = auto: 64, or 16 for a code grid.")
                          ] = TrainConfig.batch_size,
    error: Annotated[ErrorMeasure, typer.Option(help="Reconstruction error measure. ssim: the structural "
                                                     "dissimilarity of the worst 10% of pixels, each divided by "
                                                     "how well good images are rebuilt there; scaled-mse: the "
                                                     "squared residual, so divided, of all pixels; mse: the plain "
                                                     "mean squared error.")
                     ] = ErrorMeasure(TrainConfig.error),
    code_radius: Annotated[CodeRadius, typer.Option(help="How a code's length enters the latent density. sqrt: "
                                                         "square-rooted, so the code's direction weighs more; "
                                                         "linear: as it is.")] = CodeRadius(TrainConfig.code_radius),
    extra_convs: Annotated[int, typer.Option(help="Stride-1 3x3 convolutions after each resolution change "
                                                  "in the encoder and decoder (0-4).")] = TrainConfig.extra_convs,
    shift_radius: Annotated[int, typer.Option(help="The latent density is averaged over the image moved by up "
                                                   "to this many pixels each way (0-2; 0 = the image alone).")
                            ] = TrainConfig.shift_radius,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, data and device give the same model.")
                    ] = TrainConfig.seed,
    device: DeviceOption = "auto",
    adversarial: Annotated[bool, typer.Option(help="Match the codes to a Gaussian prior with a discriminator "
                                                   "(off by default: it weakened the latent density).")
                           ] = TrainConfig.adversarial,
    robust: Annotated[bool, typer.Option(help="Reject likely outliers in DATA during training.")
                      ] = TrainConfig.robust,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable file instead of skipping it.")
                      ] = TrainConfig.strict,
    memory_limit_mb: Annotated[int, typer.Option(help="Keep decoded training images in memory up to this size; "
                                                      "above it, read them from disk every epoch.")
                               ] = TrainConfig.memory_limit_mb,
    density_codes: Annotated[int, typer.Option(help="Most training codes the density holds (every image scored is "
                                                    "compared with each): above it, a sample drawn with --seed.")
                             ] = TrainConfig.density_codes,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its checkpoint.")] = False,
    list_rejected: Annotated[bool, typer.Option(help="Print the training images rejected as likely outliers "
                                                     "on stdout, one per line.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Train a detector on a folder of good images and write a model folder with its card."""
    config = TrainConfig(epochs=epochs, image_size=image_size, code_grid=code_grid, latent_dim=latent_dim,
                         batch_size=batch_size,
                         error=error.value, code_radius=code_radius.value, extra_convs=extra_convs,
                         shift_radius=shift_radius, seed=seed, device=device,
                         adversarial=adversarial, robust=robust, strict=strict, memory_limit_mb=memory_limit_mb,
                         density_codes=density_codes)
    from aadetect import pipeline, store

    reporter = reporter_for(quiet)
    card = pipeline.train(data, out, config, reporter=reporter, resume=resume)
    if card is None:  # a process other than rank 0 under torchrun: rank 0 wrote the model, and reports
        return
    reporter.info(f"model written to {out} ({card.data.image_count} images, "
                  f"{card.training.epochs_run} epochs, {card.training.seconds:.0f} s, "
                  f"{card.data.rejected_count} rejected as likely outliers)")
    if list_rejected:
        with report_of_a_change():
            for name in store.read_names(store.resolved(out) / store.REJECTED_FILE):
                typer.echo(name)


@app.command(epilog=examples(
    "aadetect calibrate --good labelled/good --anomalous labelled/bad",
    "aadetect calibrate --good labelled/good --target-fpr 0.01 --format json"))
@user_errors
def calibrate(
    good: GoodOption,
    anomalous: Annotated[Optional[Path], typer.Option(help="Folder of labelled anomalous images.")] = None,
    model: ModelOption = Path(DEFAULT_MODEL),
    objective: Annotated[Objective, typer.Option(help="What the joint threshold search maximises.")]
        = Objective(OBJECTIVES[0]),
    target_fpr: Annotated[Optional[float], typer.Option(
        help="Flag at most this fraction of the good samples (with no --anomalous: the model's own training "
             f"budget, {TrainConfig.target_fpr} by default).")] = None,
    one_class: Annotated[bool, typer.Option(
        "--one-class", help="Use the anomalous samples only to place the thresholds: keep every training image "
                            "in the density and do not compare images with the samples.")] = False,
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help="Output format.")] = ReportFormat.table,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Choose the thresholds from a few labelled samples and write them into the model card.

    Training images that look like the anomalous samples (hidden anomalies, or good images too close to
    them) are left out of the density first, and listed in the model folder's lookalikes.txt. With them,
    the samples then make a model of their kind: an image is also flagged when it is far likelier to be
    of that kind than good ("lookalike").
    """
    from aadetect import pipeline

    card = pipeline.calibrate(model, good, anomalous, objective=objective.value, target_fpr=target_fpr,
                              one_class=one_class, device=device, reporter=reporter_for(quiet))
    thresholds = card.thresholds
    report = {"thresholds": {"reconstruction": thresholds.reconstruction_cut, "density": thresholds.density_cut,
                             "anomaly_log_odds": thresholds.odds_cut},
              "metrics": card.calibration.metrics, "good_count": card.calibration.good_count,
              "anomalous_count": card.calibration.anomalous_count,
              "lookalikes": len(card.calibration.lookalike_codes), "warnings": card.calibration.warnings}
    with report_of_a_change():
        if format == ReportFormat.json:
            typer.echo(json.dumps(report))
        else:
            odds = report["thresholds"]["anomaly_log_odds"]
            print_table("calibration", [("reconstruction threshold", report["thresholds"]["reconstruction"]),
                                        ("density threshold", report["thresholds"]["density"]),
                                        *([("anomaly log-odds threshold", odds)] if odds is not None else []),
                                        *report["metrics"].items(), ("lookalikes left out", report["lookalikes"])])


@app.command(epilog=examples(
    "aadetect score img.png",
    "aadetect score photos/ --heatmaps maps/ --format csv > scores.csv",
    "find incoming -name '*.png' | aadetect score - --format jsonl | jq 'select(.anomaly)'",
    "aadetect score photos/ --shard 2/8 --format jsonl > part-2.jsonl   # one of 8 machines"))
@user_errors
def score(
    paths: Annotated[list[str], typer.Argument(help="Images or folders to score; '-' reads paths from stdin, "
                                                    "one per line.", show_default=False)],
    model: ModelOption = Path(DEFAULT_MODEL),
    format: Annotated[ScoreFormat, typer.Option("--format", "-f", help="Output format.")] = ScoreFormat.table,
    null: Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are NUL-separated "
                                                             "(for names with newlines).")] = False,
    heatmaps: Annotated[Path | None, typer.Option(help="Write each image with its anomaly map over it to "
                                                       "DIR/<name>.heatmap.png.", metavar="DIR")] = None,
    shard: Annotated[Optional[str], typer.Option(
        help="Score only shard K of N: the inputs whose path, as given (a folder's files by their own paths), "
             "hashes to K; the same on every machine and run. 'auto' takes K (and N) from a scheduler's array: "
             "Slurm's SLURM_ARRAY_TASK_ID and _COUNT, or a Kubernetes Indexed Job's JOB_COMPLETION_INDEX "
             "with --shards N. Join the parts with `aadetect merge`.", metavar="K/N|auto")] = None,
    shards: Annotated[Optional[int], typer.Option(help="With --shard auto: how many shards there are, where "
                                                       "the scheduler gives only the index.")] = None,
    device: DeviceOption = "auto",
    engine: Annotated[Engine, typer.Option(help="torch; or onnx: the model's export (`aadetect export`) on ONNX "
                                                "Runtime, without torch (CPU only; needs the extra 'onnx').")
                      ] = Engine.torch,
    quiet: QuietOption = False,
) -> None:
    """Score images. Each row says where the anomaly map peaks (peak_x, peak_y, in the image's own pixels).
    Exit status: 0 all normal, 1 some anomalous, 2 usage error or unreadable input,
    130 interrupted, 141 the reader of the output left early (e.g. `| head`), 3 a bug in aadetect."""
    from aadetect.heatmaps import HeatmapFolder
    from aadetect.images import Unreadable, expand
    from aadetect.shards import chosen_shard

    selected = chosen_shard(shard, shards, os.environ, lambda message: say(f"aadetect: note: {message}"))
    if engine == Engine.onnx:  # imports no torch
        from aadetect.onnx_engine import OnnxDetector

        if device.strip().lower() not in ("auto", "cpu"):
            raise UserError(f"--engine onnx runs on the CPU; --device {device} needs --engine torch")
        detector = OnnxDetector.load(model)
    else:
        from aadetect.scoring import Detector

        detector = Detector.load(model, device)
    drawn = None
    if heatmaps is not None:
        heatmaps.mkdir(parents=True, exist_ok=True)
        drawn = HeatmapFolder(heatmaps)
    writer = RowWriter(format)
    unreadable = anomalous = False
    inputs = expand(read_paths(paths, null))
    if selected is not None:
        inputs = (item for item in inputs if selected.holds(item.name))
    while chunk := list(itertools.islice(inputs, SCORE_CHUNK)):  # memory stays flat on an endless stdin
        results = detector.score_images([item for item in chunk if not isinstance(item, Unreadable)],
                                        maps=drawn is not None)
        for item in chunk:  # input order, bad paths and bad images alike
            if isinstance(item, Unreadable):
                ref_name, row, error = item.name, None, item.message
            else:
                ref, row, error = next(results)
                ref_name = ref.name
                if row is not None and drawn is not None:
                    try:
                        row["heatmap"] = str(drawn.write(ref, row.pop("anomaly_map")))
                    except UserError as exc:  # the file changed since it was scored
                        row, error = None, str(exc)
            if error is not None:  # said even with --quiet: it decides the exit status
                unreadable = True
                error = first_line(error, MESSAGE_LIMIT)
                say(f"aadetect: error: {error}")
            anomalous |= bool(row and row["anomaly"])
            writer.write({"path": ref_name, **(row or {}), "error": error})
    if writer.count == 0 and selected is None:  # a shard may well hold none of them
        raise UserError("no images to score (give paths, or '-' with paths on stdin)")
    writer.close()
    raise typer.Exit(EXIT_USAGE if unreadable else EXIT_ANOMALY if anomalous else 0)


@app.command(epilog=examples(
    "aadetect evaluate --good test/good --anomalous test/bad",
    "aadetect evaluate --good test/good --anomalous test/bad --format json | jq .auroc",
    "aadetect evaluate --good test/good --anomalous test/bad --masks test/bad-masks",
    "aadetect evaluate --good test/good --anomalous test/bad --report report.html"))
@user_errors
def evaluate(
    good: GoodOption,
    anomalous: Annotated[Path, typer.Option(help="Folder of labelled anomalous images.")],
    model: ModelOption = Path(DEFAULT_MODEL),
    masks: Annotated[Path | None, typer.Option(help="Folder of the anomalous images' defect masks (same paths as "
                                                    "under --anomalous; bright = defect): adds the maps' "
                                                    "pixel AUROC.")] = None,
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help="Output format.")] = ReportFormat.table,
    report_file: Annotated[Path | None, typer.Option(
        "--report", help="Also write one self-contained HTML page (no network needed to open it): curves, "
                         "histograms, the worst mistakes with their anomaly maps, the model card; needs "
                         "the optional extra 'report'.", metavar="PATH")] = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Measure a model on labelled images: AUROC, AUPRC, balanced accuracy, F1, confusion; with --masks, how
    well its anomaly maps point at the defects (pixel AUROC)."""
    from aadetect import pipeline

    if report_file is not None:  # said before any image is scored
        from aadetect.atomic import check_writable
        from aadetect.extras import require

        require("report")
        check_writable(report_file)
    reporter = reporter_for(quiet)
    evaluation = pipeline.evaluation(model, good, anomalous, masks=masks, device=device, reporter=reporter)
    report = evaluation.report
    if report_file is not None:
        from aadetect.report import write_report

        write_report(report_file, evaluation)
        reporter.info(f"report written to {report_file}")
    print_report(report, format)
    if report["unreadable"]:  # measured on the rest, but the input was not all usable: like `score`
        say(f"aadetect: error: {pipeline.unreadable_summary(report['unreadable'])}")
        raise typer.Exit(EXIT_USAGE)


@app.command(epilog=examples(
    "aadetect demo",
    "aadetect demo --out /tmp/cells --format json"))
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's images and model.")]
        = Path("aadetect-demo"),
    seed: Annotated[int, typer.Option(help="Seed for the generated images and the training.")] = 0,
    epochs: Annotated[int, typer.Option(help="Most training epochs.")] = DEMO_EPOCHS,
    train_images: Annotated[int, typer.Option(help="How many good cell images to generate for training.")
                            ] = DEMO_TRAIN_IMAGES,
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help="Output format.")] = ReportFormat.table,
    quiet: QuietOption = False,
) -> None:
    """Run the whole job offline on generated microscope-like cell images and print the evaluation."""
    from aadetect.demo import run_demo

    reporter = reporter_for(quiet)
    report = run_demo(out, seed=seed, epochs=epochs, train_images=train_images, reporter=reporter)
    print_report(report, format)


@app.command(epilog=examples(
    "aadetect serve                                  # http://127.0.0.1:8000/",
    "aadetect serve --model parts-model --port 9000 --max-upload-mb 5",
    "curl -F file=@img.png 'http://127.0.0.1:8000/score?heatmap=true'"))
@user_errors
def serve(
    model: ModelOption = Path(DEFAULT_MODEL),
    host: Annotated[str, typer.Option(help="Address to listen on. The default answers this machine only; "
                                           "0.0.0.0 answers every network it is on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one, said on stderr).")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body, in MB; larger ones get 413.")] = 20.0,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """A web page to try images on, and a JSON API: POST /score (multipart, field 'file', repeatable;
    ?heatmap=true adds each map as base64 PNG), GET /model, GET /healthz. Needs the optional extra 'serve'.
    Ctrl-C stops it (exit 130)."""
    from aadetect.extras import require

    require("serve")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0-65535, got {port}")
    if not max_upload_mb > 0:
        raise UserError(f"--max-upload-mb must be above 0, got {max_upload_mb}")
    from aadetect.devices import resolve_device
    from aadetect.serve import serve as serve_model

    def listening(url: str, loopback: bool) -> None:
        say(f"aadetect: serving {model} at {url} (Ctrl-C stops)")
        if not loopback:
            say(f"aadetect: warning: listening on {host}: other machines can reach this page and its API, "
                f"and there is no authentication")

    serve_model(model, host=host, port=port, device=resolve_device(device), max_upload_mb=max_upload_mb,
                quiet=quiet, on_listening=listening)


class ExportFormat(str, Enum):
    onnx = "onnx"


@app.command(epilog=examples(
    "aadetect export --format onnx                  # writes aadetect-model/model.onnx",
    "aadetect export --model parts-model --format onnx && aadetect score --model parts-model --engine onnx img.png"))
@user_errors
def export(
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="What to export to: onnx, one graph "
                                                                         "from uint8 pixels to every number of "
                                                                         "`score` and the anomaly map.")],
    model: ModelOption = Path(DEFAULT_MODEL),
    quiet: QuietOption = False,
) -> None:
    """Export the model's whole scoring path, as calibrated now, into its folder (model.onnx), for `score
    --engine onnx` or any ONNX runtime; decoding and resizing stay outside (the card describes them). A later
    `calibrate` makes the export stale: export again. Needs the optional extra 'onnx'."""
    from aadetect.extras import require

    require("onnx")
    from aadetect.export import export_model

    card = export_model(model, format.value)
    reporter_for(quiet).info(f"exported to {model / card.export.file} (opset {card.export.opset}, "
                             f"outputs: {', '.join(card.export.outputs)})")


@app.command(epilog=examples(
    "aadetect merge part-*.jsonl > scores.jsonl",
    "aadetect merge part-*.csv --expect inputs.txt > scores.csv"))
@user_errors
def merge(
    parts: Annotated[list[Path], typer.Argument(help="Outputs of `score --shard` (--format jsonl or csv).",
                                                show_default=False)],
    expect: Annotated[Optional[Path], typer.Option(help="A file of the inputs' paths, one per line, as given to "
                                                        "`score`: each must appear in exactly one part.",
                                                   metavar="LIST")] = None,
) -> None:
    """Join the shards' outputs into one on stdout (the CSV header once), each input once: a path in two parts,
    or, with --expect, one of the list in none, is an error (exit 2). Otherwise the exit status is score's:
    0 all normal, 1 some anomalous, 2 some input could not be scored."""
    from aadetect.shards import merge as merged_parts

    expected = None
    if expect is not None:
        try:
            text = expect.read_bytes().decode("utf-8", "surrogateescape")
        except OSError as exc:
            raise UserError(f"{expect}: cannot read ({exc.strerror or exc})") from None
        expected = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    result = merged_parts(parts, expected)
    sys.stdout.write(result.text)
    raise typer.Exit(EXIT_USAGE if result.failed else EXIT_ANOMALY if result.anomalous else 0)


def read_paths(paths: list[str], null: bool) -> Iterator[str]:
    """Arguments as given; '-' is replaced by the paths on stdin, read as they come (stdin may never end)."""
    for path in paths:
        if path != "-":
            yield path
            continue
        if sys.stdin is None:
            raise UserError("'-' reads paths from stdin, but stdin is closed")
        for line in stdin_lines(sys.stdin.buffer, b"\0" if null else b"\n"):
            if not null and b"\0" in line:  # no path holds one: NUL-separated names, or an image's bytes
                raise UserError("stdin holds NUL bytes, so it is not a list of paths one per line "
                                "(for NUL-separated paths, as `find -print0` writes them, add --null)")
            text = line.decode("utf-8", "surrogateescape")
            text = text if null else text.removesuffix("\r")
            if text.strip():
                yield text


def stdin_lines(stream, separator: bytes) -> Iterator[bytes]:
    """`stream` split at `separator`, a block at a time; a line longer than any path is refused."""
    read = getattr(stream, "read1", stream.read)  # read1: what has arrived, without waiting for a full block
    pending = b""
    while block := read(1 << 16):
        *lines, pending = (pending + block).split(separator)
        yield from lines
        if len(pending) > MAX_PATH_BYTES:
            raise UserError(f"stdin: a line of over {MAX_PATH_BYTES:,} bytes, so it is not a list of paths")
    if pending:
        yield pending


class RowWriter:
    """Score rows to stdout: JSON lines and CSV stream as they come, a table is drawn at the end."""

    def __init__(self, format: ScoreFormat):
        self.format = format
        self.count = 0
        self.rows: list[dict] = []
        if format == ScoreFormat.csv:
            import csv

            self.csv = csv.DictWriter(sys.stdout, fieldnames=SCORE_FIELDS, lineterminator="\n")
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        self.count += 1
        row = {name: row.get(name) for name in SCORE_FIELDS}
        if self.format == ScoreFormat.jsonl:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        elif self.format == ScoreFormat.csv:
            self.csv.writerow({k: csv_cell(v) for k, v in row.items()})
            sys.stdout.flush()
        else:
            self.rows.append(row)

    def close(self) -> None:
        if self.format != ScoreFormat.table:
            return
        stdout_console().print(score_table(self.rows))


def score_table(rows: list[dict]):
    """Score rows for people. A long path or error wraps in its cell rather than being cut to the
    same prefix on every row in a narrow terminal."""
    from rich.table import Column, Table
    from rich.text import Text

    with_odds = any(row.get("anomaly_log_odds") is not None for row in rows)  # models calibrated with anomalies
    with_heatmaps = any(row.get("heatmap") is not None for row in rows)
    names = [name for name in SCORE_FIELDS[:-1] if (with_odds or name != "anomaly_log_odds")
             and (with_heatmaps or name != "heatmap") and name != "peak_y"]
    names[names.index("peak_x")] = "peak"  # one column, x,y: the table must fit a terminal
    table = Table(*(Column(name, overflow="fold") if name in ("path", "reason", "heatmap") else name
                    for name in names))
    for row in rows:  # Text, not str: paths are data, never markup
        if row["error"]:
            table.add_row(Text(row["path"]), *[""] * (len(names) - 2), Text(row["error"], style="red"))
        else:
            odds = [f"{row['anomaly_log_odds']:.4g}"] if with_odds else []
            heatmap = [Text(row["heatmap"] or "")] if with_heatmaps else []
            table.add_row(Text(row["path"]), f"{row['reconstruction_error']:.6g}", f"{row['log_density']:.6g}",
                          *odds, f"{row['score']:.4g}", "yes" if row["anomaly"] else "no", row["reason"],
                          f"{row['peak_x']},{row['peak_y']}", *heatmap)
    return table


def csv_cell(value) -> str:
    """As JSON spells it (true, false, full-precision floats), empty for missing."""
    if value is None:
        return ""
    if isinstance(value, (bool, float)):
        return json.dumps(value)
    return str(value)


def stdout_console():
    """Rich output for stdout; when piped, wide enough that no column is cut."""
    from rich.console import Console

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:  # rich would exit 1 ("anomalous"); `user_errors` exits 141
            raise BrokenPipeError

    return StdoutConsole() if sys.stdout.isatty() else StdoutConsole(width=1000, no_color=True)


def print_table(title: str, items) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table("metric", "value", title=title)
    for name, value in items:
        table.add_row(str(name), f"{value:.6g}" if isinstance(value, float) else Text(str(value)))
    stdout_console().print(table)


def print_report(report: dict, format: ReportFormat) -> None:
    if format == ReportFormat.json:
        typer.echo(json.dumps(report))
        return
    from rich.table import Table

    ranking = Table("signal", "AUROC", "AUPRC", title="ranking (higher is better)")
    for signal in report["auroc"]:  # reconstruction, density, lookalike (calibrated with anomalies), combined
        ranking.add_row(signal, f"{report['auroc'][signal]:.4f}", f"{report['auprc'][signal]:.4f}")
    if "pixel_auroc" in report:
        ranking.add_row(f"pixels ({report['masked_images']} masked images)", f"{report['pixel_auroc']:.4f}", "")
    decision = Table("metric", "value", title="decisions at the card's thresholds"
                     + ("" if report["thresholds_calibrated"] else " (uncalibrated defaults)"))
    for name in ("balanced_accuracy", "f1", "tpr", "fpr"):
        decision.add_row(name, f"{report[name]:.4f}")
    counts = report["confusion"]
    decision.add_row("confusion", f"tp {counts['tp']}  fp {counts['fp']}  tn {counts['tn']}  fn {counts['fn']}")
    decision.add_row("images", f"{report['n_good']} good, {report['n_anomalous']} anomalous")
    console = stdout_console()
    console.print(ranking)
    console.print(decision)


def main() -> None:
    if sys.stdout is None:  # started with stdout closed (`>&-`): no place for the data, and fd 1 may be reused
        say("aadetect: error: standard output is closed (redirect it to a file or /dev/null instead)")
        raise SystemExit(EXIT_USAGE)
    # A file name that is not valid UTF-8 (Linux allows any bytes) is printed as the bytes it is,
    # so it can be piped back in, instead of failing on a strict output encoding.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    if isinstance(getattr(sys.stdout, "buffer", None), io.FileIO):
        # PYTHONUNBUFFERED (common in CI images) writes straight to the file, and a write that a pipe
        # takes only part of (a big table, then `| head`) is cut short without an error. A buffered
        # writer writes the rest, or raises BrokenPipeError: exit 141.
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(sys.stdout.buffer), encoding=sys.stdout.encoding,
                                      errors="surrogateescape", line_buffering=True)
    status = 0
    try:
        app()
    except SystemExit as done:
        status = done.code
    error = stdout_write_error()  # what the command left in the buffer must reach the file, or be said
    if isinstance(error, BrokenPipeError):
        status = EXIT_READER_LEFT
    elif error is not None:
        say(f"aadetect: error: standard output: {error.strerror or error}")
        status = EXIT_USAGE
    raise SystemExit(status)
