"""``python -m wsgi_pgconn.bench``: the benchmark, kept under its short name.

The code lives in :mod:`wsgi_pgconn.tooling.bench` (tooling: the library never
imports it); this module only runs it.  ``python -m wsgi_pgconn.bench --help``
lists the options.
"""

from __future__ import annotations

import sys

from wsgi_pgconn.tooling.bench.runner import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
