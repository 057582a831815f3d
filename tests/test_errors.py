"""The one-line reasons that UserErrors quote from the exceptions of other libraries."""

from __future__ import annotations

from aadetect.errors import first_line


def test_first_line_is_one_short_line_and_never_empty():
    assert first_line(ValueError("bad header\nat byte 12\n")) == "bad header"
    assert first_line(ValueError("\n  \n  the reason  \nmore")) == "the reason"
    assert first_line(EOFError()) == "EOFError"
    assert first_line(RuntimeError("x" * 500), limit=160) == "x" * 160
