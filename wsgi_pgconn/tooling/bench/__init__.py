"""The headline benchmark: ``python -m wsgi_pgconn.bench``.

It serves one small page (three short queries in one transaction) through a
real WSGI server once per *variant* -- a way of getting a PostgreSQL
connection for the request, on one driver (``-pg2`` psycopg2, ``-pg3``
psycopg 3) -- drives it with ``wrk`` (or a Python load generator) and prints
one table: requests/s with the spread over the repeats, p50 and p99 latency,
the server connections held, and ratios against connecting per request over
TCP with password authentication and against a hand-held persistent
connection per thread of the same driver, then the project's targets that
the run measured. Its header says what it measured on: the client's and the
servers' Python, the servers' versions, PostgreSQL's version, the CPUs and
the load average at the start. ``--rtt 1ms`` puts a latency relay
(:mod:`wsgi_pgconn.tooling.relay`) between the servers and PostgreSQL and
adds the round trips per request and the relay's CPU to the table.

Modules:

``runner``    command line, orchestration and the table
``variants``  the list of variants and what each one needs
``apps``      the WSGI applications the servers import (one per variant)
``django_app`` the page as a Django project (the Django variants)
``fsa_app``   the page as a Flask-SQLAlchemy app (the ``fsa-*`` variants)
``rowdriver`` keeps every driver but the row's out of the row's server process
``servers``   starting mod_wsgi-express, gunicorn or werkzeug on loopback
``load``      wrk and the fallback Python load generator
``pgbouncer`` a throwaway PgBouncer in transaction mode, reached over its unix socket
``database``  the database under test (the throwaway cluster, or DATABASE_URL with
              ``--use-database-url``), and the table it creates and drops there
``environment`` what the run measured on, for the header
``cpu``       ``python -m wsgi_pgconn.tooling.bench.cpu``: CPU and round trips per
              request of the same applications, called in process (no server);
              round trips counted by the relay
"""
