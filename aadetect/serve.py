"""`aadetect serve`: a web page to try images on, and a JSON API giving the numbers `aadetect score` gives.

Uploads are written to a temporary folder, removed after the request, and scored by the same path as files
on disk (`Detector.score_images`), so an image gets bit-identical numbers here and from the CLI. One thread
scores for every request (`ScoringQueue`): scoring spreads its images over every core and sets torch's
thread count for the whole process while it runs, so two scorers must never run at once; and the requests
waiting meanwhile are scored together, as one batch, which is what keeps the cores busy under load.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import tempfile
import threading
import traceback
from concurrent.futures import Future
from importlib import resources
from pathlib import Path, PurePath

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from aadetect import store
from aadetect.errors import UserError, first_line
from aadetect.heatmaps import heatmap_png
from aadetect.images import IMAGE_SUFFIXES, ImageRef, original_image
from aadetect.scoring import Detector

MOST_IMAGES_AT_ONCE = 64  # images the scoring thread takes from waiting requests in one round
MESSAGE_LIMIT = 400  # characters of an error message, as on the command line
UPLOAD_CHUNK = 1 << 20  # bytes copied from an upload to its temporary file at a time
# the page's own files only: no script, style or image from anywhere else, nor from a data: URI but images
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}
log = logging.getLogger("aadetect.serve")


class Unscorable(Exception):
    """An upload that is not an image the model can score: the HTTP status and the CLI's one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": first_line(Exception(message), MESSAGE_LIMIT)}, status_code=status,
                        headers=SECURITY_HEADERS)


def create_app(model_dir: str | Path, *, device: str = "cpu", max_upload_bytes: int = 20 << 20) -> FastAPI:
    """The web app for the model in `model_dir`, read once now."""
    stored = store.read_model(Path(model_dir), device)
    detector, card = Detector.of(stored, device), stored.card
    summary = {"model": str(Path(model_dir).resolve()), **card.summary()}
    scoring = ScoringQueue(detector)
    app = FastAPI(title="aadetect", version=card.aadetect_version, docs_url=None, redoc_url=None,
                  openapi_url=None)
    page = {route: (resources.files("aadetect").joinpath("web", name).read_bytes(), media_type)
            for route, (name, media_type) in PAGE_FILES.items()}

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("error on %s %s:\n%s", request.method, request.url.path,
                  "".join(traceback.format_exception(exc)))  # for the operator's log, never for the client
        return error_response(500, "internal error (a bug in aadetect; the server's log has the details)")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "send the images as multipart/form-data, each in a field named 'file'")

    @app.exception_handler(Unscorable)
    async def unscorable(request: Request, exc: Unscorable) -> JSONResponse:
        return error_response(exc.status, str(exc))

    def page_file(route: str):
        def serve_file() -> Response:
            content, media_type = page[route]
            return Response(content, media_type=media_type, headers=SECURITY_HEADERS)
        return serve_file

    for route in PAGE_FILES:
        app.get(route, include_in_schema=False)(page_file(route))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> JSONResponse:
        return JSONResponse(summary, headers=SECURITY_HEADERS)

    @app.post("/score")
    def score(file: list[UploadFile] = File(...), heatmap: bool = False) -> Response:
        """One row per uploaded image, in order, with the fields of a `score --format jsonl` row (and
        `heatmap_png`, base64, with ?heatmap=true). Any upload that is not a scorable image fails the request."""
        with tempfile.TemporaryDirectory(prefix="aadetect-serve-") as folder:
            refs = [saved_upload(upload, Path(folder) / str(index)) for index, upload in enumerate(file)]
            results = scoring.score(refs, maps=heatmap)
            rows = []
            for ref, numbers, error in results:
                if error is not None:
                    raise Unscorable(415, error)
                anomaly_map, _ = numbers.pop("anomaly_map", None), numbers.pop("image_size", None)
                row = {"path": ref.name, **numbers, "heatmap": None, "error": None}
                if heatmap:
                    png = heatmap_png(original_image(ref), anomaly_map)
                    row["heatmap_png"] = base64.b64encode(png).decode("ascii")
                rows.append(row)
        # as `score` writes its rows: the same floats, to the last digit
        return Response(json.dumps(rows, ensure_ascii=False), media_type="application/json",
                        headers=SECURITY_HEADERS)

    return UploadLimit(app, max_upload_bytes)


class ScoringQueue:
    """The one thread that scores. Each round it takes every request waiting (up to MOST_IMAGES_AT_ONCE
    images) and scores their images in one `score_images` call: an image's numbers do not depend on its
    batch, and scoring pads every batch to a fixed size, so one image alone would leave most of it empty."""

    def __init__(self, detector: Detector):
        self.detector = detector
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()  # (refs, maps, future)
        threading.Thread(target=self._serve_forever, name="aadetect-scoring", daemon=True).start()

    def score(self, refs: list[ImageRef], *, maps: bool) -> list[tuple]:
        """(ref, numbers, error) for each ref, as `Detector.score_images` yields them; waits its turn."""
        future: Future = Future()
        self.waiting.put((refs, maps, future))
        return future.result()

    def _serve_forever(self) -> None:
        while True:
            jobs = [self.waiting.get()]
            while sum(len(refs) for refs, _, _ in jobs) < MOST_IMAGES_AT_ONCE and not self.waiting.empty():
                jobs.append(self.waiting.get())
            try:
                results = list(self.detector.score_images([ref for refs, _, _ in jobs for ref in refs],
                                                          maps=any(maps for _, maps, _ in jobs)))
            except BaseException as exc:  # a bug: each request answers 500, and the thread goes on
                for _, _, future in jobs:
                    future.set_exception(exc)
                continue
            start = 0
            for refs, _, future in jobs:  # with maps where any request of the round asked for them
                future.set_result(results[start:start + len(refs)])
                start += len(refs)


def saved_upload(upload: UploadFile, stem: Path) -> ImageRef:
    """The upload written to `stem` + its own suffix (never its own name: that is the client's text), as an
    image to score named as the client named it."""
    name = upload.filename or "upload"
    suffix = PurePath(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise Unscorable(415, f"{name}: unsupported format {suffix or '(no suffix)'!r} "
                              f"(supported: {', '.join(IMAGE_SUFFIXES)})")
    path = stem.with_suffix(suffix)
    with open(path, "wb") as out:
        while chunk := upload.file.read(UPLOAD_CHUNK):
            out.write(chunk)
        if out.tell() == 0:
            raise Unscorable(400, f"{name}: empty file")
    return ImageRef(path, shown=name)


class UploadLimit:
    """Refuses a request body over `max_bytes` with 413: at once when its Content-Length says so, else as soon
    as that many bytes have come (the body is read ahead, up to the limit, before the app sees any of it)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self.too_large(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        response = error_response(413, f"upload too large (over {self.max_bytes / 2**20:g} MB; the server's "
                                       f"--max-upload-mb)")
        await response(scope, receive, send)


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          max_upload_mb: float = 20, quiet: bool = False, on_listening=None) -> None:
    """Serve the model until interrupted. The socket is bound here first, so that a port in use is the user's
    one-line error, not a server's log; `on_listening(url, loopback)` is told where it listens, and whether
    only this machine can reach it."""
    import ipaddress
    import socket

    import uvicorn

    app = create_app(model_dir, device=device, max_upload_bytes=int(max_upload_mb * 2**20))
    try:
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host}: not an address to listen on ({exc.args[-1]})") from None
    try:
        listening = socket.create_server(address[:2], family=family)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({os.strerror(exc.errno) if exc.errno else exc})") from None
    bound_host, bound_port = listening.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    if on_listening is not None:
        on_listening(f"http://{shown_host}:{bound_port}/", ipaddress.ip_address(bound_host).is_loopback)
    config = uvicorn.Config(app, log_config=log_config(quiet), access_log=not quiet, timeout_graceful_shutdown=5)
    with listening:
        uvicorn.Server(config).run(sockets=[listening])


def log_config(quiet: bool) -> dict:
    """uvicorn's logging, on stderr (stdout is for data), warnings only when quiet."""
    level = "WARNING" if quiet else "INFO"
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["stderr"], "level": level, "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "aadetect.serve")},
    }
