"""Typed errors of the method package; the CLI and the server map them to messages and status codes."""


class BitfitError(Exception):
    """Base of every error this package raises on purpose."""


class DataError(BitfitError, ValueError):
    """A data file cannot be used as given: missing columns, unknown labels, no rows."""


class BiasSetFormatError(BitfitError, ValueError):
    """A file is not a well-formed bias set."""


class BackboneMismatch(BitfitError, ValueError):
    """A bias set was trained on another backbone than the one it is applied to."""

    def __init__(self, expected: str, got: str, what: str = "bias set"):
        self.expected, self.got = expected, got
        super().__init__(
            f"{what} was trained on backbone {got[:16]}… but the loaded backbone is {expected[:16]}…; "
            "a bias set only applies to the exact backbone (architecture, slots and weights) it was trained on"
        )
