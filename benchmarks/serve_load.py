"""A bounded load test of `aadetect serve` on loopback (issue 27).

    python benchmarks/serve_load.py [--clients 8] [--requests 2000] [--out FILE.json]

Starts the real server (`aadetect serve --port 0`) in a subprocess on a model trained here on
64 px demo cells, and has `--clients` threads POST one 64 px PNG each to /score until `--requests`
have been answered. It measures what an operator needs before putting the server behind a queue:
requests/s, latency p50 / p99, errors (any non-200 or exception), the server's resident memory
after a warm-up, at the end and at its peak (does it grow under load?), and the server's and the
clients' CPU time (the clients share the machine's cores with the server). It checks that every
answer for the same image carries the same numbers, and that they equal `aadetect score`'s for
that image. For comparison without HTTP: `aadetect score DIR` over the same images in one process,
and `Detector.score_images` in this process on one image per call (as the server gets them) and on
all of them in one call. Then it stops the server with SIGINT and records its exit status (130
expected).

Prints a markdown table; exits 1 if any request failed or any answer differed from an earlier one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is a package of the repository
    sys.path.insert(0, str(REPO))

from benchmarks.speed import machine  # noqa: E402

PYTHON = sys.executable
IMAGE_SIZE = 64
TRAIN_EPOCHS = 3
WARM_UP_REQUESTS = 20
EXIT_ANOMALY = 1  # `aadetect score`'s exit status when some image is anomalous
LISTENING = re.compile(r"aadetect: serving .* at (http://\S+/) \(Ctrl-C stops\)")


def make_model_and_images(work: Path, distinct: int) -> tuple[Path, dict[str, bytes]]:
    """A model trained on 64 px demo cells (calibrated on 20 + 20), and `distinct` 64 px test cells,
    half good and half anomalous, as PNG bytes keyed by a file name that says which."""
    from aadetect.synthetic import write_demo_dataset

    half = distinct // 2
    folders = write_demo_dataset(work / "data", size=IMAGE_SIZE, n_test=distinct - half)
    model = work / "model"
    aadetect = [PYTHON, "-m", "aadetect"]
    subprocess.run([*aadetect, "train", str(folders["train"]), "--out", str(model), "--epochs", str(TRAIN_EPOCHS),
                    "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--quiet"], check=True)
    subprocess.run([*aadetect, "calibrate", "--model", str(model), "--good", str(folders["calibrate_good"]),
                    "--anomalous", str(folders["calibrate_anomalous"]), "--device", "cpu", "--quiet"],
                   stdout=subprocess.DEVNULL, check=True)
    test = [("good", path) for path in sorted(folders["test_good"].glob("*.png"))[:half]]
    test += [("anomalous", path) for path in sorted(folders["test_anomalous"].glob("*.png"))]
    return model, {f"{kind}_{path.name}": path.read_bytes() for kind, path in test}


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (resident now) or VmHWM (resident at its peak) of a process, in MB."""
    return int(proc_status(pid)[field].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """`aadetect serve` in a subprocess: its URL as it said on stderr, and its stderr kept."""

    def __init__(self, model: Path):
        self.process = subprocess.Popen([PYTHON, "-m", "aadetect", "serve", "--model", str(model), "--port", "0",
                                         "--device", "cpu", "--quiet"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        self.url = next((match.group(1) for line in self.process.stderr if (match := LISTENING.match(line))), "")
        if not self.url:
            raise RuntimeError(f"aadetect serve exited with {self.process.wait()} before it listened")
        self.stderr: list[str] = []
        # the pipe is drained all along, so a chatty server never blocks on it
        self.draining = threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True)
        self.draining.start()

    def is_python_itself(self) -> bool:
        """Whether the PID measured is the Python process that serves (no shell or launcher between)."""
        return proc_status(self.pid)["Name"].startswith("python") and os.path.realpath(
            f"/proc/{self.pid}/exe") == os.path.realpath(PYTHON)

    def wait_healthy(self, client, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"aadetect serve exited with {self.process.returncode}")
            try:
                if client.get(self.url + "healthz").status_code == 200:
                    return
            except Exception:  # not answering yet
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no 200 from {self.url}healthz in {timeout_s:.0f} s")

    def interrupt(self, timeout_s: float = 30) -> int:
        """SIGINT, as Ctrl-C sends it; the exit status (negative: killed by that signal)."""
        self.process.send_signal(signal.SIGINT)
        try:
            status = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"aadetect serve still running {timeout_s:.0f} s after SIGINT") from None
        self.draining.join(5)
        return status


class Answers:
    """Every answer's row, by image: the first answer for an image is the reference the others must equal."""

    def __init__(self):
        self.lock = threading.Lock()
        self.first: dict[str, dict] = {}
        self.mismatches = 0
        self.mismatched_images: set[str] = set()

    def check(self, name: str, row: dict) -> None:
        with self.lock:
            reference = self.first.setdefault(name, row)
            if row != reference:
                self.mismatches += 1
                self.mismatched_images.add(name)


def post_image(client, url: str, name: str, png: bytes, answers: Answers) -> str | None:
    """POST one image to /score; None if it came back as one row of numbers, else what went wrong."""
    try:
        response = client.post(url + "score", files={"file": (name, png, "image/png")})
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    rows = response.json()
    if len(rows) != 1 or rows[0].get("path") != name or rows[0].get("error") is not None:
        return f"unexpected answer: {response.text[:200]}"
    answers.check(name, rows[0])
    return None


def run_load(url: str, images: dict[str, bytes], clients: int, requests: int, answers: Answers) -> dict:
    """`clients` threads, each with its own keep-alive connection, share `requests` POSTs (request i sends
    image i mod the number of images). Latencies in seconds, errors as text, the wall time of it all."""
    import httpx

    names = list(images)
    latencies: list[float] = []
    errors: list[str] = []
    record = threading.Lock()

    def client_loop(first: int) -> None:
        with httpx.Client(timeout=120) as client:
            for index in range(first, requests, clients):
                name = names[index % len(names)]
                start = time.perf_counter()
                error = post_image(client, url, name, images[name], answers)
                elapsed = time.perf_counter() - start
                with record:
                    latencies.append(elapsed)
                    if error is not None:
                        errors.append(error)

    threads = [threading.Thread(target=client_loop, args=(first,)) for first in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "errors": errors, "wall_s": time.perf_counter() - start}


def sample_memory(pid: int, every_s: float, stop: threading.Event, samples: list) -> None:
    """(seconds since start, VmRSS MB) of the server every `every_s` until `stop`."""
    start = time.perf_counter()
    while not stop.wait(every_s):
        samples.append((round(time.perf_counter() - start, 1), round(memory_mb(pid, "VmRSS"), 1)))


def score_cli(model: Path, work: Path, images: dict[str, bytes], count: int) -> tuple[dict[str, dict], float]:
    """`aadetect score --format jsonl` in one fresh process over `count` files (the images, repeated as the load
    repeats them): each image's row (without its path) and images/s, start-up included."""
    folder = work / "cli-images"
    folder.mkdir()
    names = list(images)
    for index in range(count):
        name = names[index % len(names)]
        (folder / f"{index:06d}_{name}").write_bytes(images[name])
    start = time.perf_counter()
    output = subprocess.run([PYTHON, "-m", "aadetect", "score", "--model", str(model), "--format", "jsonl",
                             "--device", "cpu", "--quiet", str(folder)], capture_output=True, text=True)
    rate = count / (time.perf_counter() - start)
    if output.returncode not in (0, EXIT_ANOMALY):
        raise RuntimeError(f"aadetect score exited with {output.returncode}: {output.stderr[-500:]}")
    rows = {}
    for line in output.stdout.splitlines():
        row = json.loads(line)
        rows.setdefault(Path(row.pop("path")).name.split("_", 1)[1], row)
    return rows, rate


def in_process_rates(model: Path, work: Path, images: dict[str, bytes]) -> dict:
    """Images/s of `Detector.score_images` in this process, without HTTP: the images one per call, as the
    server gets them, and all in one call, as `aadetect score DIR` gets them (after one warm-up call each)."""
    from aadetect.images import ImageRef
    from aadetect.scoring import Detector

    folder = work / "in-process-images"
    folder.mkdir()
    refs = []
    for name, png in images.items():
        (folder / name).write_bytes(png)
        refs.append(ImageRef(folder / name))
    detector = Detector.load(model, "cpu")

    def rate(calls: list[list]) -> float:
        list(detector.score_images(calls[0]))
        start = time.perf_counter()
        for refs_of_call in calls:
            list(detector.score_images(refs_of_call))
        return len(refs) / (time.perf_counter() - start)

    return {"one_per_call_images_per_s": rate([[ref] for ref in refs]), "all_in_one_call_images_per_s": rate([refs])}


def differs_from_cli(answers: Answers, cli_rows: dict[str, dict]) -> list[str]:
    """The images whose served numbers are not `aadetect score`'s (the served row's own fields aside)."""
    return sorted(name for name, row in answers.first.items()
                  if {key: value for key, value in row.items() if key in cli_rows[name] and key != "path"}
                  != cli_rows[name])


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    return result.stdout.strip() or "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (threads), each one connection")
    parser.add_argument("--requests", type=int, default=2000, help="POSTs in all, one image each, after the warm-up")
    parser.add_argument("--distinct-images", type=int, default=100,
                        help="different images sent (half good, half anomalous), each sent many times")
    parser.add_argument("--out", type=Path, help="also write the numbers here (JSON)")
    args = parser.parse_args(argv)
    import httpx

    load_average_before = os.getloadavg()  # the cores may be shared with other jobs
    work = Path(tempfile.mkdtemp(prefix="aadetect-serve-load-"))
    try:
        model, images = make_model_and_images(work, args.distinct_images)
        answers = Answers()
        server = Server(model)
        try:
            with httpx.Client(timeout=120) as client:
                server.wait_healthy(client)
                served_model = client.get(server.url + "model").json()
                names = list(images)
                warm_up_errors = [error for index in range(WARM_UP_REQUESTS)
                                  if (error := post_image(client, server.url, names[index % len(names)],
                                                          images[names[index % len(names)]], answers))]
            rss_start = memory_mb(server.pid, "VmRSS")
            server_cpu_start, client_cpu_start = cpu_seconds(server.pid), time.process_time()
            stop_sampling, rss_samples = threading.Event(), []
            sampler = threading.Thread(target=sample_memory, args=(server.pid, 1.0, stop_sampling, rss_samples))
            sampler.start()
            load = run_load(server.url, images, args.clients, args.requests, answers)
            stop_sampling.set()
            sampler.join()
            server_cpu = cpu_seconds(server.pid) - server_cpu_start
            client_cpu = time.process_time() - client_cpu_start
            rss_end, rss_peak = memory_mb(server.pid, "VmRSS"), memory_mb(server.pid, "VmHWM")
            python_itself = server.is_python_itself()
        finally:
            exit_status = server.interrupt()
        cli_rows, cli_rate = score_cli(model, work, images, args.requests)
        in_process = in_process_rates(model, work, images)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    latencies_ms = 1000 * np.array(load["latencies"])
    errors = warm_up_errors + load["errors"]
    results = {
        "machine": {**machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_before": load_average_before, "load_average_after": os.getloadavg()},
        "commit": commit(),
        "model": {**{key: served_model[key] for key in ("image_size", "channels", "code_grid", "error_measure")},
                  "training_images": served_model["training_data"]["images"],
                  "trained_on": f"{IMAGE_SIZE} px demo cells, --epochs {TRAIN_EPOCHS}, calibrated on 20 + 20"},
        "clients": args.clients, "requests": args.requests, "warm_up_requests": WARM_UP_REQUESTS,
        "distinct_images": len(images), "image_bytes_mean": float(np.mean([len(png) for png in images.values()])),
        "wall_s": load["wall_s"], "requests_per_s": args.requests / load["wall_s"],
        "latency_ms": {"p50": float(np.percentile(latencies_ms, 50)), "p99": float(np.percentile(latencies_ms, 99)),
                       "max": float(latencies_ms.max())},
        "errors": len(errors), "error_examples": errors[:5],
        "mismatches": answers.mismatches, "mismatched_images": sorted(answers.mismatched_images),
        "differ_from_cli": differs_from_cli(answers, cli_rows),
        "cli_score_images_per_s": cli_rate, "in_process": in_process,
        "server": {"pid_is_python_itself": python_itself, "rss_mb_after_warm_up": rss_start, "rss_mb_end": rss_end,
                   "rss_mb_peak": rss_peak, "rss_mb_samples": rss_samples, "cpu_s_during_load": server_cpu,
                   "exit_status_after_sigint": exit_status, "stderr_tail": server.stderr[-10:]},
        "clients_cpu_s_during_load": client_cpu,
    }
    print(render(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 1 if results["errors"] or results["mismatches"] else 0


def render(results: dict) -> str:
    server, latency, model, in_process = (results[key] for key in ("server", "latency_ms", "model", "in_process"))
    load_s = results["wall_s"]
    return "\n".join([
        f"machine: {results['machine']}  commit: {results['commit']}",
        f"model: {model}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| load | {results['requests']} POST /score of one {IMAGE_SIZE} px PNG ({results['distinct_images']} "
        f"different images), {results['clients']} clients, after {results['warm_up_requests']} warm-up requests |",
        f"| throughput | {results['requests_per_s']:.1f} requests/s ({load_s:.1f} s) |",
        f"| latency p50 / p99 / max | {latency['p50']:.0f} / {latency['p99']:.0f} / {latency['max']:.0f} ms |",
        f"| errors | {results['errors']} |",
        f"| answers unlike the first for their image | {results['mismatches']} |",
        f"| images whose served numbers differ from `aadetect score`'s | {len(results['differ_from_cli'])} |",
        f"| `aadetect score DIR` over the same {results['requests']} images, one process, start-up included | "
        f"{results['cli_score_images_per_s']:.1f} images/s |",
        f"| `Detector.score_images` in process, no HTTP: one image per call / all {results['distinct_images']} in one "
        f"call | {in_process['one_per_call_images_per_s']:.1f} / {in_process['all_in_one_call_images_per_s']:.1f} "
        f"images/s |",
        f"| server RSS after warm-up / end / peak (VmHWM) | {server['rss_mb_after_warm_up']:.0f} / "
        f"{server['rss_mb_end']:.0f} / {server['rss_mb_peak']:.0f} MB |",
        f"| CPU during the load: server / clients | {server['cpu_s_during_load']:.1f} s "
        f"({server['cpu_s_during_load'] / load_s:.2f} cores) / {results['clients_cpu_s_during_load']:.1f} s "
        f"({results['clients_cpu_s_during_load'] / load_s:.2f} cores) |",
        f"| server exit status after SIGINT | {server['exit_status_after_sigint']} "
        f"(PID measured is the Python process itself: {server['pid_is_python_itself']}) |",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
