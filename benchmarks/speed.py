"""Speed of aadetect: start-up, exact KDE, streaming scoring, memory, training.

    python benchmarks/speed.py [--quick] [--json out.json] [--device cuda]

With --device cuda it measures the GPU path only: the KDE, scoring and training on the GPU.

Prints a markdown table. Ratios are measured side by side in one run (the machines
are noisy); times are medians of several runs. Numbers go into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.kde_speed import measure_kde_speed  # noqa: E402

PYTHON = sys.executable


def wall(command: list[str], repeats: int, **kwargs) -> float:
    """Median wall time of a command, after one warm-up run (file cache)."""
    subprocess.run(command, capture_output=True, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def heavy_modules_after(args: list[str]) -> list[str]:
    code = ("import sys, runpy; sys.argv = ['aadetect', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('aadetect', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(','.join(m for m in ('torch', 'torchvision', 'scipy', 'scipy.stats') if m in sys.modules), "
            "file=sys.stderr)")
    result = subprocess.run([PYTHON, "-c", code, *args], capture_output=True, text=True)
    last_line = (result.stderr.splitlines() or [""])[-1]
    return [m for m in last_line.split(",") if m]


def write_images(folder: Path, count: int, size: int, channels: int, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(64, size, size, channels), dtype=np.uint8)
    for i in range(count):
        pixels = base[i % 64]
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / f"img_{i:06d}.png")
    return folder


def train_tiny_model(data: Path, out: Path, size: int) -> None:
    subprocess.run([PYTHON, "-m", "aadetect", "train", str(data), "--out", str(out), "--epochs", "1",
                    "--image-size", str(size), "--device", "cpu", "--quiet", "--no-robust"], check=True)


def startup(work: Path, repeats: int) -> dict:
    data = write_images(work / "startup-data", 64, 32, 1)
    model = work / "startup-model"
    train_tiny_model(data, model, 32)
    one = data / "img_000000.png"
    aadetect = [PYTHON, "-m", "aadetect"]
    rows = {
        "import_torch_s": wall([PYTHON, "-c", "import torch"], repeats),
        "help_s": wall([*aadetect, "--help"], repeats),
        "version_s": wall([*aadetect, "--version"], repeats),
        "score_one_s": wall([*aadetect, "score", "--model", str(model), "--format", "jsonl", str(one)], repeats),
    }
    rows["score_one_over_import_torch"] = rows["score_one_s"] / rows["import_torch_s"]
    rows["help_imports"] = heavy_modules_after(["--help"])
    rows["score_imports"] = heavy_modules_after(["score", "--model", str(model), "--format", "jsonl", str(one)])
    return rows


def scoring(work: Path, count: int, repeats: int, device: str = "cpu") -> dict:
    """Streaming from PNG files against the detector's own speed on decoded tensors (64x64 RGB)."""
    from PIL import Image

    from aadetect.images import decode, find_images, load_images
    from aadetect.scoring import Detector

    data = write_images(work / "rgb64-train", 256, 64, 3)
    model = work / "rgb64-model"
    train_tiny_model(data, model, 64)
    folder = write_images(work / "rgb64-score", count, 64, 3, seed=1)
    detector = Detector.load(model, device)
    refs = find_images(folder)
    pixels, _, _ = load_images(refs, 64, 3)

    def tensor_only() -> float:
        start = time.perf_counter()
        detector.measure(pixels)  # returns numpy arrays: the device has finished
        return time.perf_counter() - start

    def streaming() -> float:
        start = time.perf_counter()
        for _ in detector.score_images(refs):
            pass
        return time.perf_counter() - start

    tensor_only()  # warm-up: kernels, the KDE's per-device cache

    tensor_times, stream_times = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine
        tensor_times.append(tensor_only())
        stream_times.append(streaming())
    round_ratios = [tensor / stream for tensor, stream in zip(tensor_times, stream_times)]

    def decoding(read) -> float:  # seconds per image
        start = time.perf_counter()
        for ref in refs:
            read(ref)
        return (time.perf_counter() - start) / count

    def pillow_alone(ref) -> np.ndarray:  # the floor: Pillow's own open, decode and array
        with Image.open(ref.path) as image:
            return np.asarray(image)

    decode_times, pillow_times = [], []
    for _ in range(repeats):
        decode_times.append(decoding(lambda ref: decode(ref, 64, 3)))
        pillow_times.append(decoding(pillow_alone))
    tensor_rate = count / statistics.median(tensor_times)
    stream_rate = count / statistics.median(stream_times)
    del pixels
    return {"images": count, "rounds": repeats, "tensor_only_images_per_s": tensor_rate,
            "streaming_images_per_s": stream_rate, "streaming_over_tensor_only": stream_rate / tensor_rate,
            "round_ratios": round_ratios, "decode_us_per_image": 1e6 * statistics.median(decode_times),
            "pillow_alone_us_per_image": 1e6 * statistics.median(pillow_times)}


def onnx_scoring(work: Path, count: int, repeats: int) -> dict:
    """torch against ONNX Runtime (`aadetect export`, issue 28) on the same 64x64 RGB model: decoded tensors
    with the maps (the exported graph always draws them), and `score_images` streaming PNG files."""
    from aadetect.export import export_model
    from aadetect.images import find_images, load_images
    from aadetect.onnx_engine import OnnxDetector
    from aadetect.scoring import Detector, anomaly_maps

    data, model = work / "rgb64-train", work / "rgb64-model"
    if not model.exists():
        write_images(data, 256, 64, 3)
        train_tiny_model(data, model, 64)
    start = time.perf_counter()
    export_model(model)
    export_s = time.perf_counter() - start
    folder = write_images(work / "onnx-score", count, 64, 3, seed=4)
    refs = find_images(folder)
    pixels, _, _ = load_images(refs, 64, 3)
    array = pixels.numpy()
    detector, engine = Detector.load(model, "cpu"), OnnxDetector.load(model)

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    runs = {
        "torch_tensor": lambda: anomaly_maps(detector.score(pixels, maps=True), detector.thresholds),
        "onnx_tensor": lambda: engine.run(array),
        "torch_streaming": lambda: list(detector.score_images(refs)),
        "onnx_streaming": lambda: list(engine.score_images(refs)),
    }
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so all see the same machine
        for name, run in runs.items():
            times[name].append(timed(run))
    rates = {f"{name}_images_per_s": count / statistics.median(values) for name, values in times.items()}
    return {"images": count, "rounds": repeats, "export_s": export_s,
            "onnx_bytes": (model / "model.onnx").stat().st_size, **rates}


def render_onnx(results: dict) -> str:
    o = results["onnx"]
    return "\n".join([
        f"| 64x64 RGB, {o['images']} images (medians of {o['rounds']} interleaved rounds) | torch | ONNX Runtime |",
        "|---|---|---|",
        f"| decoded tensors, with the maps | {o['torch_tensor_images_per_s']:.0f} images/s | "
        f"{o['onnx_tensor_images_per_s']:.0f} images/s |",
        f"| `score_images`, streaming PNG files (peaks included) | {o['torch_streaming_images_per_s']:.0f} images/s "
        f"| {o['onnx_streaming_images_per_s']:.0f} images/s |",
        f"| `aadetect export --format onnx` | | {o['export_s']:.1f} s, {o['onnx_bytes'] / 1e6:.1f} MB |"])


def local_scoring(work: Path, count: int, repeats: int) -> dict:
    """End to end at 128 px with the default code grid (16x16 codes): `aadetect score FOLDER --format jsonl`
    in a fresh process, PNG files in, rows out, with and without heatmaps."""
    data = write_images(work / "gray128-train", 128, 128, 1)
    model = work / "gray128-model"
    train_tiny_model(data, model, 128)
    folder = write_images(work / "gray128-score", count, 128, 1, seed=3)
    command = [PYTHON, "-m", "aadetect", "score", "--model", str(model), "--format", "jsonl", "--quiet", str(folder)]
    plain = wall(command, repeats)
    drawn = wall([*command, "--heatmaps", str(work / "gray128-heatmaps")], repeats)
    return {"images": count, "end_to_end_images_per_s": count / plain, "with_heatmaps_images_per_s": count / drawn}


def peak_rss(work: Path, counts: tuple[int, ...]) -> dict:
    """Peak resident memory of `aadetect score --format jsonl` over folders of different sizes."""
    model = work / "rgb64-model"
    result = {}
    for count in counts:
        folder = write_images(work / f"rss-{count}", count, 64, 3, seed=2)
        code = ("import resource, subprocess, sys; "
                "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([PYTHON, "-c", code, PYTHON, "-m", "aadetect", "score", "--model", str(model),
                              "--format", "jsonl", "--quiet", str(folder)], capture_output=True, text=True, check=True)
        result[f"peak_rss_mb_{count}"] = int(out.stdout.strip()) / 1024
        shutil.rmtree(folder)
    return result


def training(repeats: int, device: str = "cpu") -> dict:
    """Training images/s on decoded tensors, and what flush-denormal and channels_last change."""
    import torch

    from aadetect.config import Architecture, TrainConfig
    from aadetect.training import train_autoencoder

    result = {}
    for label, size, channels in (("28x28_gray", 28, 1), ("64x64_rgb", 64, 3)):
        images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1100, channels, size, size),
                                                                    dtype=np.uint8))
        config = TrainConfig(epochs=2, image_size=size, robust=False, patience=100)
        arch = Architecture.for_images(size, channels, 16, config.extra_convs)  # the default network
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            train_autoencoder(images, arch, config, device)
            times.append(time.perf_counter() - start)
        result[f"train_images_per_s_{label}"] = 2 * 990 / statistics.median(times)
    if device == "cpu":
        result.update(layout_and_denormals())
    return result


def layout_and_denormals(steps: int = 20) -> dict:
    """One reconstruction step (64 RGB images, 64 px) under each CPU setting, interleaved."""
    import torch

    from aadetect.config import Architecture
    from aadetect.model import AdversarialAutoencoder

    arch = Architecture.for_images(64, 3, 16, extra_convs=0)
    batch = torch.rand(64, 3, 64, 64)
    settings = {"nchw": (False, False), "channels_last": (True, False), "nchw+flush_denormal": (False, True),
                "channels_last+flush_denormal": (True, True)}
    models = {}
    for name, (channels_last, _) in settings.items():
        torch.manual_seed(0)
        model = AdversarialAutoencoder(arch)
        models[name] = (model.to(memory_format=torch.channels_last) if channels_last else model,
                        torch.optim.Adam(model.parameters(), 1e-3),
                        batch.contiguous(memory_format=torch.channels_last) if channels_last else batch)
    times = {name: [] for name in settings}
    for _ in range(steps):
        for name, (_, flush) in settings.items():
            model, optimizer, images = models[name]
            torch.set_flush_denormal(flush)
            start = time.perf_counter()
            _, reconstruction = model(images)
            loss = (reconstruction - images).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    torch.set_flush_denormal(False)
    return {f"step_ms_{name}": 1000 * statistics.median(values[steps // 4:]) for name, values in times.items()}


def machine() -> dict:
    import torch

    model_name = ""
    try:
        model_name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": model_name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--device", default="cpu", help="cpu (everything) or cuda (KDE, scoring, training)")
    parser.add_argument("--onnx-only", action="store_true", help="only torch against ONNX Runtime (issue 28)")
    args = parser.parse_args(argv)
    if args.onnx_only:
        work = Path(tempfile.mkdtemp(prefix="aadetect-speed-"))
        try:
            results = {"machine": machine(), "onnx": onnx_scoring(work, 500 if args.quick else 2000, 3 if args.quick else 5)}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"machine: {results['machine']}\n\n{render_onnx(results)}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        return 0
    if args.device != "cpu":
        return gpu_main(args)
    repeats = 3 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="aadetect-speed-"))
    results: dict = {"machine": machine()}
    try:
        results["startup"] = startup(work, repeats)
        kde = measure_kde_speed(2000, 1000, 16, 3) if args.quick else measure_kde_speed()
        results["kde"] = kde
        results["scoring"] = scoring(work, 500 if args.quick else 5000, 3 if args.quick else 7)
        results["onnx"] = onnx_scoring(work, 500 if args.quick else 2000, 3 if args.quick else 5)
        results["local"] = local_scoring(work, 300 if args.quick else 2000, 1 if args.quick else 3)
        results["memory"] = peak_rss(work, (200, 1000) if args.quick else (1000, 20000))
        results["training"] = training(1 if args.quick else 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(results) + "\n\n" + render_onnx(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def gpu_main(args) -> int:
    """The GPU path: exact KDE, streaming scoring and training on the device (start-up is the CPU's)."""
    import torch

    work = Path(tempfile.mkdtemp(prefix="aadetect-speed-"))
    results: dict = {"machine": {**machine(), "gpu": torch.cuda.get_device_name(args.device)}}
    try:
        results["kde"] = measure_kde_speed(device=args.device)
        results["scoring"] = scoring(work, 500 if args.quick else 5000, 3, args.device)
        results["training"] = training(1 if args.quick else 3, args.device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    k, sc, tr = results["kde"], results["scoring"], results["training"]
    print("\n".join([
        f"machine: {results['machine']}", "", "| measure (GPU) | value |", "|---|---|",
        f"| KDE {k['n_codes']} codes x {k['n_queries']} queries, d={k['dim']} | scipy {k['scipy_s']:.2f} s, "
        f"ours {k['ours_s']:.4f} s = {k['speedup']:.0f}x, max rel diff {k['max_rel_diff']:.1e} |",
        f"| scoring 64x64 RGB, decoded tensors | {sc['tensor_only_images_per_s']:.0f} images/s |",
        f"| scoring 64x64 RGB, streaming PNG files | {sc['streaming_images_per_s']:.0f} images/s = "
        f"{sc['streaming_over_tensor_only']:.0%} of tensor-only |",
        f"| training 28x28 gray | {tr['train_images_per_s_28x28_gray']:.0f} images/s |",
        f"| training 64x64 RGB | {tr['train_images_per_s_64x64_rgb']:.0f} images/s |"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def render(results: dict) -> str:
    s, k, sc, lo, mem, tr = (results[key] for key in ("startup", "kde", "scoring", "local", "memory", "training"))
    counts = sorted(int(key.rsplit("_", 1)[1]) for key in mem)
    lines = [
        f"machine: {results['machine']}",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| `python -c 'import torch'` | {s['import_torch_s']:.2f} s | |",
        f"| `aadetect --help` | {s['help_s']:.2f} s (imports: {', '.join(s['help_imports']) or 'no torch/scipy'}) "
        f"| < 0.5 s, no torch |",
        f"| `aadetect --version` | {s['version_s']:.2f} s | < 0.5 s |",
        f"| `aadetect score one.png` | {s['score_one_s']:.2f} s = {s['score_one_over_import_torch']:.2f}x import "
        f"torch (imports: {', '.join(s['score_imports'])}) | <= 1.3x |",
        f"| KDE {k['n_codes']} codes x {k['n_queries']} queries, d={k['dim']} | scipy {k['scipy_s']:.2f} s, "
        f"ours {k['ours_s']:.3f} s = {k['speedup']:.1f}x, max rel diff {k['max_rel_diff']:.1e} | >= 20x, <= 1e-9 |",
        f"| scoring 64x64 RGB, decoded tensors | {sc['tensor_only_images_per_s']:.0f} images/s | |",
        f"| scoring 64x64 RGB, streaming PNG files | {sc['streaming_images_per_s']:.0f} images/s = "
        f"{sc['streaming_over_tensor_only']:.0%} of tensor-only (medians of {sc['rounds']} interleaved rounds; "
        f"rounds {min(sc['round_ratios']):.0%}-{max(sc['round_ratios']):.0%}) | >= 70% |",
        f"| scoring 128x128 gray PNG files, code grid 16x16, `aadetect score DIR` end to end ({lo['images']} "
        f"images, start-up included) | {lo['end_to_end_images_per_s']:.0f} images/s | >= 100 |",
        f"| the same with `--heatmaps DIR` | {lo['with_heatmaps_images_per_s']:.0f} images/s | |",
        f"| decoding one 64x64 RGB PNG (`images.decode`) / Pillow's own open, decode and array | "
        f"{sc['decode_us_per_image']:.0f} / {sc['pillow_alone_us_per_image']:.0f} µs | |",
        f"| peak RSS, score {counts[0]} / {counts[1]} images | {mem[f'peak_rss_mb_{counts[0]}']:.0f} MB / "
        f"{mem[f'peak_rss_mb_{counts[1]}']:.0f} MB "
        f"({mem[f'peak_rss_mb_{counts[1]}'] / mem[f'peak_rss_mb_{counts[0]}'] - 1:+.1%}) | within 10% |",
        f"| training 28x28 gray | {tr['train_images_per_s_28x28_gray']:.0f} images/s | |",
        f"| training 64x64 RGB | {tr['train_images_per_s_64x64_rgb']:.0f} images/s | |",
    ]
    for key, value in tr.items():
        if key.startswith("step_ms_"):
            lines.append(f"| reconstruction step, 64 RGB images 64 px, {key[8:]} | {value:.1f} ms | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
