"""Optional extras: the libraries a capability needs, checked where it is used, with a one-line way out."""

from __future__ import annotations

import importlib.util

from aadetect.errors import UserError

EXTRAS = {"report": ("matplotlib", "jinja2"), "serve": ("fastapi", "uvicorn", "multipart"),
          "onnx": ("onnx", "onnxruntime", "onnxscript")}
PACKAGE_NAMES = {"multipart": "python-multipart"}


def require(extra: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise a UserError naming the install command when a library of `extra` (or those of its `modules` that
    a use needs) is missing. Only looks for the modules (no import), so that a command fails before any work
    and `--help` stays instant."""
    missing = [module for module in modules or EXTRAS[extra] if importlib.util.find_spec(module) is None]
    if missing:
        names = ", ".join(PACKAGE_NAMES.get(module, module) for module in missing)
        raise UserError(f"this needs the optional extra '{extra}' ({names} not installed): "
                        f"pip install 'aadetect[{extra}]'")
