"""The one exception for what the user did wrong."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one short line (its type when it has none), for a UserError."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text[:limit]


class UserError(Exception):
    """Bad input or options: shown as one line at the CLI boundary (exit 2), never as a traceback."""

