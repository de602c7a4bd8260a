"""Trainable-parameter budgets: "the same number of trainable parameters as LoRA rank r".

A budget is given per adapted layer, in one of three forms (see :func:`parse_budget`):

* ``"lora-<r>"`` (case-insensitive, ``r`` a positive integer): as many trainable parameters as a LoRA adapter
  of rank ``r`` on the same layer, ``r * (in_features + out_features)`` (:func:`lora_parameter_count`);
* a positive integer ``n`` (or its decimal string): ``n`` trainable parameters per layer, whatever its size;
* ``None``: no budget (the caller uses its explicit sizes).

For PMSS the trainable tensor of a layer is ``U`` of shape ``(k_in, k_out)``, i.e. ``k_in * k_out``
parameters; :func:`pmss_k_for_budget` turns a parameter count into ``(k_in, k_out)``.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Literal, overload

from .errors import ConfigError, SelectionError, ShapeError

__all__ = [
    "ParameterBudget",
    "budget_to_parameters",
    "lora_parameter_count",
    "parse_budget",
    "pmss_k_for_budget",
]

_VALID_FORMS = "valid: 'lora-<r>' with r a positive integer (e.g. 'lora-8'), a positive integer, or None"
_LORA_RE = re.compile(r"lora-([0-9]+)", re.IGNORECASE)


@dataclass(frozen=True)
class ParameterBudget:
    """A parsed budget: ``kind='lora'`` with ``value`` the LoRA rank, or ``kind='parameters'`` with ``value``
    the number of trainable parameters per layer."""

    kind: Literal["lora", "parameters"]
    value: int

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "parameters"):
            raise ConfigError(f"ParameterBudget kind={self.kind!r} is invalid; valid: 'lora', 'parameters'")
        if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
            raise ConfigError(f"ParameterBudget value={self.value!r} is invalid: expected an integer >= 1")

    def parameters(self, out_features: int, in_features: int) -> int:
        """Trainable parameters per layer of shape ``(out_features, in_features)`` under this budget."""
        if self.kind == "lora":
            return lora_parameter_count(out_features, in_features, self.value)
        return self.value

    def __str__(self) -> str:
        return f"lora-{self.value}" if self.kind == "lora" else str(self.value)


def _positive_int(name: str, value: object, error: type[Exception]) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        result = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise error(f"{name}={value!r} must be a positive integer") from None
    if result < 1:
        raise error(f"{name}={result} must be a positive integer (>= 1)")
    return result


def parse_budget(budget: str | int | ParameterBudget | None) -> ParameterBudget | None:
    """Parse a trainable-parameter budget.

    Accepted forms:

    * ``None`` -> ``None`` (no budget);
    * ``"lora-<r>"``, case-insensitive, surrounding whitespace ignored, ``r >= 1`` ->
      ``ParameterBudget("lora", r)`` (``r * (in + out)`` parameters per layer);
    * a positive ``int`` ``n``, or a string of decimal digits -> ``ParameterBudget("parameters", n)``
      (``n`` parameters per layer);
    * an existing :class:`ParameterBudget` is returned unchanged.

    Raises:
        ConfigError: any other value (``bool``, ``0``, negatives, ``"lora-0"``, ``"lora8"``, ``"foo"``,
            floats); the message names the value and the valid forms.
    """
    if budget is None or isinstance(budget, ParameterBudget):
        return budget
    if isinstance(budget, str):
        text = budget.strip()
        match = _LORA_RE.fullmatch(text)
        if match is not None:
            rank = int(match.group(1))
            if rank >= 1:
                return ParameterBudget("lora", rank)
        elif text.isdecimal() and text.isascii() and int(text) >= 1:
            return ParameterBudget("parameters", int(text))
        raise ConfigError(f"invalid budget {budget!r}; {_VALID_FORMS}")
    if isinstance(budget, bool):
        raise ConfigError(f"invalid budget {budget!r}; {_VALID_FORMS}")
    try:
        n = operator.index(budget)
    except TypeError:
        raise ConfigError(f"invalid budget {budget!r} of type {type(budget).__name__}; {_VALID_FORMS}") from None
    if n < 1:
        raise ConfigError(f"invalid budget {n}: must be positive; {_VALID_FORMS}")
    return ParameterBudget("parameters", n)


def lora_parameter_count(out_features: int, in_features: int, r: int) -> int:
    """Trainable parameters of a rank-``r`` LoRA adapter on a layer: ``r * (in_features + out_features)``.

    (``A`` is ``r x in_features``, ``B`` is ``out_features x r``; no bias.)
    """
    out_features = _positive_int("out_features", out_features, ShapeError)
    in_features = _positive_int("in_features", in_features, ShapeError)
    r = _positive_int("r", r, ConfigError)
    return r * (in_features + out_features)


@overload
def budget_to_parameters(budget: str | int | ParameterBudget, out_features: int, in_features: int) -> int: ...


@overload
def budget_to_parameters(budget: None, out_features: int, in_features: int) -> None: ...


def budget_to_parameters(budget: str | int | ParameterBudget | None, out_features: int, in_features: int) -> int | None:
    """Trainable parameters per layer of shape ``(out_features, in_features)`` for ``budget``.

    ``"lora-<r>"`` -> ``r * (in_features + out_features)``; an integer ``n`` -> ``n``; ``None`` -> ``None``.
    """
    parsed = parse_budget(budget)
    out_features = _positive_int("out_features", out_features, ShapeError)
    in_features = _positive_int("in_features", in_features, ShapeError)
    if parsed is None:
        return None
    return parsed.parameters(out_features, in_features)


def pmss_k_for_budget(n_params: int, out_features: int, in_features: int) -> tuple[int, int]:
    """PMSS skeleton sizes ``(k_in, k_out)`` for a budget of ``n_params`` trainable parameters per layer.

    Rule: ``k = floor(sqrt(n_params))``, clipped to ``1 <= k <= min(out_features, in_features) - 1``, and
    ``k_in = k_out = k``; hence ``k_in * k_out <= n_params`` whenever ``n_params >= 1``. The core ``U`` is
    kept square because ``rank(delta_W) <= min(k_in, k_out)``: a rectangular ``U`` would spend parameters
    without raising the attainable rank. The upper clip is the largest ``k`` that
    :func:`structpeft.selection.select_skeleton` accepts (``k < min(out, in)``), so on a small layer with a
    large budget fewer parameters are used.

    Examples: MiniLM ``384 x 384`` at ``lora-8``: ``n = 8 * 768 = 6144`` -> ``k = 78`` (``78^2 = 6084``);
    ``out=1536, in=384`` at ``lora-8``: ``n = 8 * 1920 = 15360`` -> ``k = 123`` (``123^2 = 15129``);
    ``4096 x 4096`` at ``lora-8``: ``n = 65536`` -> ``k = 256``.

    Raises:
        ConfigError: ``n_params`` not a positive integer.
        ShapeError: a feature size not a positive integer.
        SelectionError: ``min(out_features, in_features) == 1`` (no skeleton size is valid).
    """
    n_params = _positive_int("n_params", n_params, ConfigError)
    out_features = _positive_int("out_features", out_features, ShapeError)
    in_features = _positive_int("in_features", in_features, ShapeError)
    k_max = min(out_features, in_features) - 1
    if k_max < 1:
        raise SelectionError(
            f"layer of shape ({out_features}, {in_features}) is too small for a PMSS skeleton: k must "
            f"satisfy 1 <= k < min(out, in) = {k_max + 1}"
        )
    k = min(max(math.isqrt(n_params), 1), k_max)
    return k, k
