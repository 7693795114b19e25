"""Tooling around wsgi_pgconn, not part of the library.

``bench``   the headline benchmark (``python -m wsgi_pgconn.bench``) and the
            real-server helpers the test suite shares with it
``tempdb``  throwaway PostgreSQL clusters for tests, examples and benchmarks
            (``python -m wsgi_pgconn.tempdb``)

The library (``wsgi_pgconn`` and ``wsgi_pgconn.django``) never imports this
package: an application that only uses the middleware never loads it.
"""

from __future__ import annotations
