"""`aadetect serve`: the JSON API in process, the real server over HTTP, and the page in a real browser."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from conftest import invoke, jsonl

pytest.importorskip("fastapi", reason="needs the extra aadetect[serve]")
from fastapi.testclient import TestClient  # noqa: E402

from aadetect.serve import create_app  # noqa: E402

LIMIT = 256 << 10  # bytes: the tests' upload limit


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir, device="cpu", max_upload_bytes=LIMIT), raise_server_exceptions=False) as c:
        yield c


def upload(*paths: Path, name: str | None = None) -> list:
    return [("file", (name or path.name, path.read_bytes(), "image/png")) for path in paths]


def cli_rows(model_dir, *paths: Path) -> list[dict]:
    result = invoke("score", "--model", model_dir, "--format", "jsonl", *paths)
    assert result.exit_code in (0, 1), result.stderr
    return jsonl(result.stdout)


def without_path(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "path"}


def test_scores_equal_the_cli_to_the_last_digit_in_the_order_sent(client, model_dir, dataset):
    good, bad = sorted(dataset["good"].iterdir())[0], sorted(dataset["anomalous"].iterdir())[0]
    response = client.post("/score", files=upload(good, bad, good))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    rows = response.json()
    assert [row["path"] for row in rows] == [good.name, bad.name, good.name]  # as the client named them
    expected = cli_rows(model_dir, good, bad, good)
    assert [without_path(row) for row in rows] == [without_path(row) for row in expected]
    assert list(rows[0]) == list(expected[0])  # the same fields, in the same order
    assert rows[0]["anomaly"] is False and rows[1]["anomaly"] is True


def test_heatmaps_come_as_the_png_that_score_writes(client, model_dir, dataset, tmp_path):
    bad = sorted(dataset["anomalous"].iterdir())[1]
    rows = client.post("/score?heatmap=true", files=upload(bad)).json()
    png = base64.b64decode(rows[0]["heatmap_png"])
    assert Image.open(io.BytesIO(png)).size == Image.open(bad).size
    assert invoke("score", "--model", model_dir, "--heatmaps", tmp_path, bad).exit_code == 1
    assert png == (tmp_path / f"{bad.stem}.heatmap.png").read_bytes()
    assert "heatmap_png" not in client.post("/score", files=upload(bad)).json()[0]


def test_the_model_and_health(client, model_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    model = client.get("/model").json()
    assert model["image_size"] == 16 and model["training_data"]["images"] == 120
    assert model["thresholds"]["calibrated"] is False and model["calibration"] is None
    assert model["thresholds"]["reconstruction"] > 0


@pytest.mark.parametrize("name, content, status, message", [
    ("junk.png", b"this is not an image", 415, "junk.png: not a recognised image"),
    ("empty.png", b"", 400, "empty.png: empty file"),
    ("notes.txt", b"hello", 415, "notes.txt: unsupported format '.txt'"),
])
def test_what_is_not_an_image_gets_the_clis_one_line_message(client, name, content, status, message):
    response = client.post("/score", files=[("file", (name, content, "application/octet-stream"))])
    assert response.status_code == status
    assert list(response.json()) == ["error"] and response.json()["error"].startswith(message)
    assert "\n" not in response.json()["error"]


def test_a_multi_page_tiff_is_refused_as_the_cli_refuses_it(client, tmp_path):
    path = tmp_path / "pages.tif"
    frames = [Image.new("L", (16, 16), value) for value in (0, 255)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    response = client.post("/score", files=upload(path))
    assert response.status_code == 415 and "holds 2 pages or frames" in response.json()["error"]
    assert invoke("score", path).exit_code == 2


def test_requests_without_images_are_told_how_to_send_them(client):
    for response in (client.post("/score"), client.post("/score", data={"other": "x"})):
        assert response.status_code == 400 and "field named 'file'" in response.json()["error"]
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()


def test_an_oversize_upload_is_refused_before_it_is_read(client, dataset):
    big = [("file", ("big.png", b"\0" * (LIMIT + 1), "image/png"))]
    response = client.post("/score", files=big)
    assert response.status_code == 413 and "upload too large" in response.json()["error"]
    chunks = (b"\0" * 4096 for _ in range(LIMIT // 4096 + 2))  # no Content-Length: counted as it comes
    response = client.post("/score", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
    good = sorted(dataset["good"].iterdir())[0]
    assert client.post("/score", files=upload(good)).status_code == 200  # and the server goes on


def test_a_file_name_with_markup_is_returned_as_text(client, dataset):
    good = sorted(dataset["good"].iterdir())[0]
    name = "<script>alert(1)</script>.png"
    response = client.post("/score", files=upload(good, name=name))
    assert response.json()[0]["path"] == name and response.headers["content-type"] == "application/json"
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]


def test_a_bug_never_reaches_the_client_as_a_stack_trace(model_dir, dataset, monkeypatch):
    from aadetect.scoring import Detector

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(Detector, "score_images", broken)
    with TestClient(create_app(model_dir, device="cpu"), raise_server_exceptions=False) as client:
        response = client.post("/score", files=upload(sorted(dataset["good"].iterdir())[0]))
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
    assert response.json()["error"].startswith("internal error")


def test_concurrent_requests_give_the_numbers_of_sequential_ones(client, dataset):
    paths = sorted(dataset["good"].iterdir())[:4] + sorted(dataset["anomalous"].iterdir())[:4]
    sequential = [client.post("/score", files=upload(path)).json() for path in paths]
    concurrent: dict[int, list] = {}

    def send(index: int) -> None:
        concurrent[index] = client.post("/score", files=upload(paths[index % len(paths)])).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(concurrent[i] == sequential[i % len(paths)] for i in range(16))


def test_uploads_leave_nothing_behind(client, dataset, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    good = sorted(dataset["good"].iterdir())[0]
    client.post("/score", files=upload(good))
    client.post("/score", files=[("file", ("junk.png", b"junk", "image/png"))])
    assert list(tmp_path.iterdir()) == []


def test_without_the_extra_serve_says_how_to_install_it(model_dir):
    probe = ("import sys; sys.modules['fastapi'] = None; from aadetect.cli import main; "
             f"sys.argv = ['aadetect', 'serve', '--model', {str(model_dir)!r}]; main()")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("aadetect: error: this needs the optional extra 'serve' (fastapi not installed): "
                                     "pip install 'aadetect[serve]'")


@pytest.fixture
def server(model_dir):
    """The real `aadetect serve` on a free port of 127.0.0.1: (its URL, its process)."""
    # as a terminal starts it: with Ctrl-C's default action. A test run started in the background of a
    # non-interactive shell (`.ci/run &`) passes SIGINT down ignored, and Python then never raises
    # KeyboardInterrupt: uvicorn still stops on it, but exits 0
    process = subprocess.Popen([sys.executable, "-m", "aadetect", "serve", "--model", str(model_dir), "--port", "0",
                                "--device", "cpu", "--quiet"], stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stderr.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/) ", line)
        assert match, line + process.stderr.read()
        yield match.group(1), process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stderr.close()


def test_the_real_server_scores_over_http_and_stops_on_ctrl_c(server, model_dir, dataset):
    import httpx

    url, process = server
    assert httpx.get(url + "healthz", timeout=30).json() == {"status": "ok"}
    bad = sorted(dataset["anomalous"].iterdir())[0]
    rows = httpx.post(url + "score", files=upload(bad), timeout=60).json()
    assert [without_path(row) for row in rows] == [without_path(row) for row in cli_rows(model_dir, bad)]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    assert "interrupted" in process.stderr.read()


def chromium() -> str | None:
    return os.environ.get("AADETECT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_in_a_real_browser_shows_each_verdict(server, dataset, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (the test extra)")
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium to drive (Debian: apt-get install -y chromium; or set AADETECT_CHROMIUM)")
    url, _ = server
    good, bad = sorted(dataset["good"].iterdir())[0], sorted(dataset["anomalous"].iterdir())[0]
    marked = tmp_path / "<b>marked.png"  # a name with markup is shown as text
    shutil.copy(bad, marked)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#card dd")  # the model's summary
            page.set_input_files("#files", [str(good), str(bad), str(marked)])
            sync_api.expect(page.locator(".result.normal, .result.anomalous")).to_have_count(3, timeout=60_000)
            verdicts = page.locator(".result .verdict").all_inner_texts()
            names = page.locator(".result .name").all_inner_texts()
            assert [verdict.lower() for verdict in verdicts] == ["normal", "anomalous", "anomalous"]
            assert names == [good.name, bad.name, marked.name]
            assert page.locator(".result .name b").count() == 0
            assert page.locator(".result img.heatmap").count() == 3
        finally:
            browser.close()
