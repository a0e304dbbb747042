"""The one error type of the converter, shared by every step (config, plan, write)."""

from __future__ import annotations


class ConversionError(ValueError):
    """The source checkpoint cannot be converted as asked (missing / unexpected / mis-shaped tensors, ...)."""
