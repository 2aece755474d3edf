"""The one exception type for bad input: a message and how to fix it."""


class ConfigError(Exception):
    """Bad input from the user, reported as `maskrun: error: <what> (<how to fix>)`, exit 2."""

    def __init__(self, what: str, fix: str, help_lines: tuple[str, ...] = ()):
        super().__init__(f"{what} ({fix})")
        self.what, self.fix, self.help_lines = what, fix, help_lines
