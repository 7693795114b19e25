import sys

from wsgi_pgconn.bench.runner import main

sys.exit(main())
