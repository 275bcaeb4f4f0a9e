"""Exceptions whose messages are meant for the user of the workflow."""


class MedrobustError(Exception):
    """Base class for errors the workflow reports without a traceback's help."""


class ConfigError(MedrobustError, KeyError):
    """A config value is missing, unknown or of the wrong kind."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(MedrobustError, ValueError):
    """An input file is unreadable or its content is wrong; the message names it."""


def unknown_name(kind: str, name: str, known) -> ConfigError:
    """The error for a config name that no registry entry matches."""
    return ConfigError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
