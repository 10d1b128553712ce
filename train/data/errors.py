"""The one error type of the data pipeline."""


class DataError(ValueError):
    """Bad or unusable training data; the message names the file (and line) and says what to do."""
