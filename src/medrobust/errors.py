"""Exceptions whose messages are meant for the user of the workflow."""


class MedrobustError(Exception):
    """Base class for errors the workflow reports without a traceback's help."""


class ConfigError(MedrobustError, KeyError):
    """A config value is missing, unknown or of the wrong kind."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(MedrobustError, ValueError):
    """An input file is unreadable or its content is wrong; the message names it."""


# what a stage does with an input that raises InputError: stop, or leave it out and go on
ON_BAD_INPUT = ("fail", "skip")
# the end of a message about a damaged file one of the workflow's own jobs wrote
RERUN = "rerun the job that wrote it"


def check_choice(what: str, value, allowed) -> None:
    """Refuse a setting outside its fixed choices: `{what} must be one of a, b, not 'c'`."""
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, allowed))}, "
                          f"not {value!r}")


def unknown_name(kind: str, name: str, known) -> ConfigError:
    """The error for a config name that no registry entry matches."""
    return ConfigError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
