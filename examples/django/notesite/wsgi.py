"""WSGI entry point: Django wrapped by wsgi_pgconn's middleware.

The middleware connects to the database of DATABASES["default"] (so under
Django's test runner, to the test database), keeps the connection open
across requests, and makes every request one transaction that the ORM and
raw SQL on ``request.META["wsgi_pgconn.connection"]`` share.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notesite.settings")

from wsgi_pgconn.django import get_wsgi_application

application = get_wsgi_application()  # keywords: scope="pool", pool_size=8, ...

# The same without the helper: the middleware then takes its database from
# DATABASE_URL (which must name the database of DATABASES["default"]):
#
#     from django.core.wsgi import get_wsgi_application
#     from wsgi_pgconn import PgConnMiddleware
#
#     application = PgConnMiddleware(get_wsgi_application())
