"""Score many images with Ray Data, for users who already run Ray: one Detector per actor.

    pip install 'ray[data]'
    python examples/scale/ray_score.py MODEL_DIR IMAGE_FOLDER scores.jsonl

Ray is not a dependency of aadetect. Each actor loads the model once and scores the
batches it is given by the same path as `aadetect score`, so the numbers match it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray

from aadetect import Detector
from aadetect.images import ImageRef, find_images


class Scorer:
    def __init__(self, model_dir: str):
        self.detector = Detector.load(model_dir, device="cpu")

    def __call__(self, batch: dict) -> dict:
        refs = [ImageRef(Path(path), shown=path) for path in batch["path"]]
        rows = [{"path": ref.name, **(row or {}), "error": error}
                for ref, row, error in self.detector.score_images(refs)]
        return {"row": [json.dumps(row) for row in rows]}


def main(model_dir: str, images: str, out: str) -> None:
    paths = [ref.name for ref in find_images(images)]
    scored = ray.data.from_items([{"path": path} for path in paths]).map_batches(
        Scorer, fn_constructor_args=(model_dir,), batch_size=256, concurrency=4)
    with open(out, "w") as lines:
        for record in scored.iter_rows():
            lines.write(record["row"] + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
