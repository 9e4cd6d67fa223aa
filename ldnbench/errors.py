"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """Bad input from the user: the CLI prints the message as one line and exits non-zero.

    The message must say what is wrong and how to fix it. ``exit_code`` 2 is for bad names or
    options (usage errors), 1 for everything else (missing files, corrupt data, ...).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
