"""The one place that plugs structpeft's methods into Hugging Face PEFT.

PEFT's ``register_peft_method`` only accepts names of its own ``PeftType`` enum, so an outside package registers
by adding entries, keyed by the plain upper-case method name, to PEFT's three mappings (``PeftType`` is a ``str``
enum, so string keys are found by the same lookups). Tested on the PEFT range pinned in pyproject.toml by
``tests/surm/test_registration.py``, which fails loudly if a PEFT release moves these mappings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import peft.mapping as peft_mapping

from .errors import StructPeftError

if TYPE_CHECKING:
    from peft.config import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner


def register(peft_type: str, config_cls: type[PeftConfig], tuner_cls: type[BaseTuner], prefix: str) -> None:
    """Make ``peft_type`` usable by ``get_peft_model`` / ``PeftModel.from_pretrained`` (idempotent)."""
    mappings = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
    missing = [name for name in mappings if not isinstance(getattr(peft_mapping, name, None), dict)]
    if missing:
        import peft

        raise StructPeftError(
            f"the installed peft {peft.__version__} has no {', '.join(missing)} in peft.mapping; "
            "structpeft supports peft>=0.21,<0.22"
        )
    # PEFT types the keys PeftType; a str key is found by the same lookups (PeftType is a str enum, see above)
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls  # type: ignore[index]  # str key, see above
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls  # type: ignore[index]  # str key, see above
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix  # type: ignore[index]  # str key, see above


def register_all() -> None:
    from .peft.config import SURM_PEFT_TYPE, SurmConfig
    from .peft.model import SurmModel
    from .peft.pmss import PMSS_PEFT_TYPE, PmssConfig, PmssModel

    register(SURM_PEFT_TYPE, SurmConfig, SurmModel, SurmModel.prefix)
    register(PMSS_PEFT_TYPE, PmssConfig, PmssModel, PmssModel.prefix)
