"""``python -m structpeft.cli``: the same as the ``structpeft`` console script."""

from structpeft.cli import main

raise SystemExit(main())
