"""The one exception family that the CLI turns into a single line on stderr and exit status 2."""


class RaysemiError(ValueError):
    """A problem with what the user gave (input, config, dataset, checkpoint), said in one line."""
