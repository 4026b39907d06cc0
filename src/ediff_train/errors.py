"""One exception type for user-facing mistakes, so entry points can print one line and exit."""


class EdiffError(Exception):
    """A problem with the user's input or files; its message is shown as a single line."""
