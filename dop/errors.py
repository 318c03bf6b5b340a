"""``DopError``: an error a user can cause (a config value, a file, a budget, a model that does not fit).

Every such error class of dop derives from it, next to its usual base (``ValueError``, ...). The CLI
prints its message as one line, without a traceback (``debug=true`` or ``HYDRA_FULL_ERROR=1`` shows
it); any other exception is a bug and keeps its traceback.
"""


class DopError(Exception):
    """An error a user can cause; its message names the key or file and what is valid."""
