"""Django's own connection pool (OPTIONS["pool"]) is refused with the equivalent settings named.

Refused when a connection is to be opened (the connection parameters are
asked for), not when the wrapper is built: Django builds it while importing
the models, before the system check wsgi_pgconn.E001 can report it.
"""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from wsgi_pgconn.django.base import DatabaseWrapper


@pytest.mark.parametrize("pool", [True, {"min_size": 2, "max_size": 8, "timeout": 3}])
def test_djangos_pool_option_is_refused_with_the_equivalent_settings(pool: object) -> None:
    settings_dict = {
        **connections["default"].settings_dict,
        "OPTIONS": {"pool": pool},
    }
    wrapper = DatabaseWrapper(settings_dict, "pooled")
    with pytest.raises(ImproperlyConfigured) as caught:
        wrapper.get_connection_params()
    message = str(caught.value)
    assert message.startswith("DATABASES['pooled']['OPTIONS']['pool'] turns on Django's own")
    for setting in (
        "WSGI_PGCONN_SCOPE=pool",
        "WSGI_PGCONN_POOL_SIZE for 'max_size'",
        "WSGI_PGCONN_POOL_TIMEOUT for 'timeout'",
        "WSGI_PGCONN_MAX_AGE for 'max_lifetime'",
        "WSGI_PGCONN_MAX_IDLE for 'max_idle'",
    ):
        assert setting in message


def test_without_the_pool_option_the_wrapper_is_built() -> None:
    settings_dict = {**connections["default"].settings_dict, "OPTIONS": {}}
    params = DatabaseWrapper(settings_dict, "plain").get_connection_params()
    assert params["dbname"] == settings_dict["NAME"]
