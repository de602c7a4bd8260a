"""PEFT glue: configs, the shared layer wrapper and the tuners of structpeft's methods."""

from .config import SurmConfig
from .model import StructuredTuner, SurmModel

__all__ = ["StructuredTuner", "SurmConfig", "SurmModel"]
