"""The ecosystem tests import ``eco_models`` from this folder."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
