"""Test databases: Django's, plus closing the middleware's connections before a DROP.

``DROP DATABASE`` (and ``CREATE DATABASE ... TEMPLATE``, used to clone test
databases for parallel runs) fails while other sessions are connected. The
connections that DjangoPgConnMiddleware keeps for the alias are closed first;
they reopen at the next request.
"""

from __future__ import annotations

from django.db.backends.postgresql import creation as _postgresql

from . import session

__all__ = ["DatabaseCreation"]


class DatabaseCreation(_postgresql.DatabaseCreation):  # type: ignore[misc]
    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        session.close_middlewares(self.connection.alias)
        super()._destroy_test_db(test_database_name, verbosity)

    def _clone_test_db(self, suffix: str, verbosity: int, keepdb: bool = False) -> None:
        session.close_middlewares(self.connection.alias)
        super()._clone_test_db(suffix, verbosity, keepdb)
