"""The one exception type users see: a single line that says what was wrong and what to do."""


class EqzError(Exception):
    """A problem the user can fix. The CLI prints ``str(error)`` as one line and exits non-zero.

    ``exit_code`` 2 means bad input (a wrong flag, file or value); 1 means the run itself failed.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# what to do about a file eqz ships that is missing or broken
REINSTALL = "reinstall eqz (in a checkout: make clean && make setup; else pip install --force-reinstall eqz)"
