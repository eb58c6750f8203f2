"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or an unusable file: reported as `cmalign: error: <message>`, exit code 2."""
