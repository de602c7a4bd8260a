"""structpeft: structured parameter-efficient fine-tuning as Hugging Face PEFT methods.

``import structpeft`` registers the methods with PEFT, after which ``peft.get_peft_model`` and
``peft.PeftModel.from_pretrained`` accept their configs and saved adapters.
"""

from ._registration import register_all as _register_all
from .errors import (
    AdapterFileError,
    BaseModelMismatchError,
    ConfigError,
    MergeError,
    MissingExtraError,
    MixedBatchError,
    SelectionError,
    ShapeError,
    StateDictError,
    StructPeftError,
    TargetModulesError,
    UnknownStructureError,
    UnsupportedLayerError,
)
from .export import to_lora
from .operators import OPERATORS
from .peft.config import SurmConfig
from .peft.pmss import PmssConfig

__version__ = "0.1.0"

_register_all()

__all__ = [
    "OPERATORS",
    "AdapterFileError",
    "BaseModelMismatchError",
    "ConfigError",
    "MergeError",
    "MissingExtraError",
    "MixedBatchError",
    "PmssConfig",
    "SelectionError",
    "ShapeError",
    "StateDictError",
    "StructPeftError",
    "SurmConfig",
    "TargetModulesError",
    "UnknownStructureError",
    "UnsupportedLayerError",
    "__version__",
    "to_lora",
]
