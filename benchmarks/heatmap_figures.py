"""The heatmap pictures of docs/how-it-works.md: a few good and defective images of a trained model,
each as `aadetect score --heatmaps` draws it, side by side in one small PNG.

    python benchmarks/heatmap_figures.py --model MODEL --good DIR --anomalous DIR --out docs/figures/x.png

The first `--count` images of each folder (sorted, as `score` finds them) make a row each: good
on top, defective below. Each tile is the heatmap file itself, resized to `--tile` pixels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw


def heatmaps(model: Path, folder: Path, count: int, out: Path) -> list[tuple[Path, dict]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    result = subprocess.run([sys.executable, "-m", "aadetect", "score", "--model", str(model), "--format", "jsonl",
                             "--quiet", "--heatmaps", str(out), *map(str, paths)], capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise SystemExit(result.stderr)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return [(Path(row["heatmap"]), row) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--good", type=Path, required=True)
    parser.add_argument("--anomalous", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--tile", type=int, default=128)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        rows = [heatmaps(args.model, folder, args.count, Path(work) / label)
                for label, folder in (("good", args.good), ("anomalous", args.anomalous))]
        label_height = 14
        sheet = Image.new("RGB", (args.tile * args.count, (args.tile + label_height) * 2), "white")
        draw = ImageDraw.Draw(sheet)
        for r, row in enumerate(rows):
            for c, (path, numbers) in enumerate(row):
                with Image.open(path) as tile:
                    tile = tile.convert("RGB").resize((args.tile, args.tile), Image.Resampling.BILINEAR)
                top = r * (args.tile + label_height)
                sheet.paste(tile, (c * args.tile, top + label_height))
                truth = "good" if r == 0 else "defective"
                verdict = "flagged" if numbers["anomaly"] else "passed"
                draw.text((c * args.tile + 3, top + 1), f"{truth}: {verdict}, {numbers['score']:.1f}", fill="black")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sheet.quantize(colors=128).save(args.out, optimize=True)  # small enough to commit
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
