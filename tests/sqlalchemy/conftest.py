"""Fixtures of the SQLAlchemy adapter's tests: engines on the run's driver, mapped tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg2.extensions
import pytest
import sqlalchemy
from sa_helpers import WireCounter, sa_url
from sqlalchemy import Column, Integer, MetaData, Table, Text
from sqlalchemy.orm import registry

import wsgi_pgconn.sqlalchemy as pgconn_sa


@pytest.fixture
def make_engine(dsn: str, app_name: str) -> Iterator[Callable[..., sqlalchemy.engine.Engine]]:
    """Engines of wsgi_pgconn.sqlalchemy on the test database, disposed of afterwards.

    Their own connections (outside requests) are tagged ``<app_name>-sa``.
    """
    made: list[sqlalchemy.engine.Engine] = []

    def make(url: Any = None, **options: Any) -> sqlalchemy.engine.Engine:
        engine = pgconn_sa.create_engine(
            url if url is not None else sa_url(dsn, application_name=app_name + "-sa"), **options
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


class Item:
    """Mapped (imperatively) to the test's table: ``id``, ``k``, ``pos``."""

    def __init__(self, k: str, pos: int | None = 1) -> None:
        self.k = k
        self.pos = pos

    id: int
    k: str
    pos: int | None


@pytest.fixture
def items(table: str) -> Iterator[tuple[type[Item], Table]]:
    """(class, Table) of the ``table`` fixture's table, mapped for this test."""
    mapper_registry = registry()
    tbl = Table(
        table,
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("k", Text),
        Column("pos", Integer, nullable=False),
    )
    cls = type("Item", (Item,), {})
    mapper_registry.map_imperatively(cls, tbl)
    yield cls, tbl
    mapper_registry.dispose()


@pytest.fixture
def wire(pg: Any) -> Iterator[WireCounter]:
    """A round-trip counting relay in front of the run's server (TCP)."""
    params = psycopg2.extensions.parse_dsn(pg.dsn())
    counter = WireCounter(params["host"], int(params["port"]))
    try:
        yield counter
    finally:
        counter.close()
