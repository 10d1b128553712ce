"""The one exception type the CLI turns into a clean message and exit code 2."""


class ConvertError(Exception):
    """A problem with the user's input (missing file, wrong family, bad tensor...).

    The message should name the tensor and/or file involved; the CLI prints it as-is, no traceback.
    """
