"""The per-run worker: ``python -m structpeft.bench.accuracy --worker SPEC`` (and the CLI otherwise)."""

import sys

from . import main

sys.exit(main())
