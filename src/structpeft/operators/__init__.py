"""The registry of structured operators: structure name -> operator class.

A new structure is one new module defining a :class:`StructuredOperator` subclass plus one line here.
"""

from __future__ import annotations

from ..errors import UnknownStructureError
from .base import BlockGridOperator, StructuredOperator
from .circulant import CirculantOperator
from .dense import DenseOperator
from .kronecker import KroneckerOperator
from .ldr import LDROperator
from .toeplitz import ToeplitzOperator

OPERATORS: dict[str, type[StructuredOperator]] = {
    CirculantOperator.structure: CirculantOperator,
    ToeplitzOperator.structure: ToeplitzOperator,
    KroneckerOperator.structure: KroneckerOperator,
    LDROperator.structure: LDROperator,
    DenseOperator.structure: DenseOperator,
}


def get_operator_class(structure: str) -> type[StructuredOperator]:
    """The operator class registered under ``structure``; :class:`UnknownStructureError` if there is none."""
    try:
        return OPERATORS[structure]
    except (KeyError, TypeError):
        raise UnknownStructureError(
            f"unknown structure {structure!r}; valid structures: {', '.join(sorted(OPERATORS))}"
        ) from None


__all__ = ["OPERATORS", "BlockGridOperator", "StructuredOperator", "get_operator_class"]
