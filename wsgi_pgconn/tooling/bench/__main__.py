import sys

from wsgi_pgconn.tooling.bench.runner import main

sys.exit(main())
