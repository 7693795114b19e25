"""Names shared by the scaling fixtures and tests (roles, PgBouncer databases)."""

from __future__ import annotations

import dataclasses

#: role of PgBouncer's server connections
POOL_ROLE = "scaling_pool"
#: role with ``ALTER ROLE ... SET statement_timeout`` (the zero-cost alternative)
LIMITED_ROLE = "scaling_limited"
LIMITED_TIMEOUT = "150ms"
#: role of pgpool-II's clients and backends
PGPOOL_ROLE = "scaling_pgpool"
#: role used directly (no pooler) to audit the statements the middleware sends
AUDIT_ROLE = "scaling_audit"
ROLES = (POOL_ROLE, LIMITED_ROLE, PGPOOL_ROLE, AUDIT_ROLE)

#: PgBouncer's client login and database names
CLIENT_USER = "app"
APP_DB = "appdb"
LIMITED_DB = "limited"


@dataclasses.dataclass(frozen=True)
class Target:
    """How the middleware reaches PostgreSQL in a test."""

    name: str
    dsn: str
    #: the middleware's ``pooler`` setting for it
    pooler: str
    #: the role the server connections log in as
    server_role: str
