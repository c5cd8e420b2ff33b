"""User mistakes: one clear line naming the bad value and the valid ones, never a traceback."""


class UserError(Exception):
    """Raised for bad input; the CLI prints it as one line and exits with status 2."""


def check_choice(what: str, value, valid) -> None:
    if value not in valid:
        raise UserError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


class Unsupported(Exception):
    """This method has no real kernel for this backend and dtype; the message says why."""
