"""Exception classes of structpeft.

Every error raised on bad user input is one of these, and its message names the bad value and what would be
valid. They subclass the built-in exception a PEFT / PyTorch user would expect (``ValueError``, ``TypeError``)
so that ``except ValueError`` keeps working.
"""

from __future__ import annotations


class StructPeftError(Exception):
    """Base class of all structpeft errors."""


class ConfigError(StructPeftError, ValueError):
    """A configuration value is invalid (wrong type, out of range, unknown choice)."""


class UnknownStructureError(ConfigError):
    """The requested structure (or selection strategy, or other named choice) is not registered."""


class ShapeError(StructPeftError, ValueError):
    """A size does not fit: a block size, a factor shape, a k larger than the layer, mismatched tensors."""


class TargetModulesError(StructPeftError, ValueError):
    """``target_modules`` matched no module of the model."""


class UnsupportedLayerError(StructPeftError, TypeError):
    """A targeted module is of a type the method cannot wrap."""


class AdapterFileError(StructPeftError, ValueError):
    """A saved adapter file is truncated, foreign or does not fit the model it is loaded onto."""


class StateDictError(StructPeftError, ValueError):
    """A state dict handed to ``save_pretrained`` holds none of the adapter's tensors (nothing would be saved)."""


class BaseModelMismatchError(AdapterFileError):
    """An adapter is loaded onto a base model whose weights differ from the one it was created on."""


class MergeError(StructPeftError, ValueError):
    """A merge would produce non-finite weights, or the adapter cannot be merged at all."""


class MixedBatchError(StructPeftError, ValueError):
    """``adapter_names`` of a mixed-adapter batch is invalid: an unknown adapter name, a list whose length differs
    from the batch size, merged adapters, or a model in training mode."""


class SelectionError(ShapeError):
    """A PMSS skeleton selection cannot be made (k too large, degenerate weight)."""


class MissingExtraError(StructPeftError, ImportError):
    """An optional dependency is missing; the message says what to install."""
