"""The project's exceptions: each says what was wrong and how to fix it.

Every error a user can cause derives from FactoryError, so the entry point can print its message
alone (no stack trace through library internals) and exit non-zero.
"""


class FactoryError(Exception):
    """Base of every error with a message meant for the user."""


class ConfigError(FactoryError, ValueError):
    """A config value (or an argument carrying one) is missing, malformed or inconsistent.
    Also a ValueError, so a direct caller's `except ValueError` still catches it."""


class CardError(FactoryError):
    """A model card's weights or tokenizer cannot be found or do not match the card."""


class CompatibilityError(FactoryError):
    """A teacher and a student cannot be paired (vocabulary or special tokens differ)."""


class ArtifactError(FactoryError):
    """An artifact in the store is incomplete, corrupted or does not match what was asked."""


class NonFiniteError(FactoryError):
    """A loss or gradient became NaN or inf."""
