"""The screenshots of the docs: `aadetect serve`'s page after scoring images, and the top of an
`evaluate --report` page, both taken in headless Chromium (Debian's `chromium`, driven by Playwright).

    python benchmarks/screenshots.py --model MODEL --good DIR --anomalous DIR --out-dir docs/figures

The page is shown scoring the images given with --show (by default the first good and the first anomalous
image of the folders, sorted); the report is of the whole folders. Both are saved as small palette PNGs, fit to commit.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1100, "height": 780}


def first_image(folder: Path) -> Path:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif"))[0]


def saved_small(png: bytes, out: Path) -> None:
    """A screenshot as a palette PNG: a tenth of the bytes, no visible loss on flat page colours."""
    import io

    with Image.open(io.BytesIO(png)) as shot:
        shot.convert("RGB").quantize(colors=128).save(out, optimize=True)
    print(f"{out} ({out.stat().st_size // 1024} KB)")


def page_screenshot(browser, model: Path, images: list[Path], out: Path) -> None:
    server = subprocess.Popen([sys.executable, "-m", "aadetect", "serve", "--model", str(model), "--port", "0",
                               "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        url = re.search(r"(http://\S+/) ", line)
        if url is None:
            raise SystemExit(line + server.stderr.read())
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url.group(1))
        page.wait_for_selector("#card dd")
        page.set_input_files("#files", [str(path) for path in images])
        page.locator(".result.normal, .result.anomalous").nth(len(images) - 1).wait_for(timeout=120_000)
        saved_small(page.screenshot(full_page=True), out)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def report_screenshot(browser, model: Path, good: Path, anomalous: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "report.html"
        subprocess.run([sys.executable, "-m", "aadetect", "evaluate", "--model", str(model), "--good", str(good),
                        "--anomalous", str(anomalous), "--report", str(report), "--quiet"],
                       check=False, stdout=subprocess.DEVNULL)
        page = browser.new_page(viewport={"width": VIEWPORT["width"], "height": 1500})
        page.goto(report.as_uri())
        saved_small(page.screenshot(), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--good", type=Path, required=True)
    parser.add_argument("--anomalous", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/figures"))
    parser.add_argument("--show", type=Path, nargs="+", help="images to score on the page (default: the first "
                                                              "good and the first anomalous one)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        try:
            page_screenshot(browser, args.model, args.show or [first_image(args.good), first_image(args.anomalous)],
                            args.out_dir / "serve-page.png")
            report_screenshot(browser, args.model, args.good, args.anomalous, args.out_dir / "report.png")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
