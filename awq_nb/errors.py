"""The one exception type users see.

Every error raised on purpose by awq_nb is an :class:`AwqNbError` whose message names the input
at fault and the fix. The CLI prints it as one line (no traceback unless ``--debug``) and the
notebook widgets show it in their output area.
"""


class AwqNbError(ValueError):
    """A problem with the user's input or environment, with a message that says how to fix it."""
