"""The one exception type that means "the user must fix something", not "sparseopt has a bug".

The CLI catches `UserError`, prints its message without a traceback and exits with status 2; every other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: an invalid config, a missing file, a corrupt checkpoint, an existing output folder."""
