"""The one exception type for errors a user can cause (bad path, bad config, bad file).

The CLI prints such an error as a single line on stderr and exits with status 2; anything
else is a bug and keeps its traceback. Modules subclass `UserError` for their own kinds.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the value or file at fault."""
