"""``python -m difforge``: the same command line as ``difforge``."""

from difforge.cli import main

raise SystemExit(main())
