"""``python -m wsgi_pgconn.tempdb``: a throwaway PostgreSQL cluster, kept under its short name.

The code lives in :mod:`wsgi_pgconn.tooling.tempdb` (tooling: the library
never imports it); this module runs its command line and re-exports what
tests and examples use, so ``from wsgi_pgconn.tempdb import
TemporaryCluster`` keeps working.
"""

from __future__ import annotations

import sys

from wsgi_pgconn.tooling.tempdb import (
    BINDIR_ENV,
    TempClusterError,
    TemporaryCluster,
    find_bindir,
    main,
)

__all__ = ["BINDIR_ENV", "TempClusterError", "TemporaryCluster", "find_bindir", "main"]

if __name__ == "__main__":
    sys.exit(main())
