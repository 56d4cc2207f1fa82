"""Errors a user can act on: one line that names the cause and the fix."""


class NoticeError(Exception):
    """Bad input at the boundary (file, row, value, model id).

    The CLI prints ``str(error)`` as one line and exits with code 2; no traceback.
    """
