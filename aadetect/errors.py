"""The one exception for what the user did wrong."""


class UserError(Exception):
    """Bad input or options: shown as one line at the CLI boundary, never as a traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
