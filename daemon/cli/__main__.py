"""`python -m daemon.cli ...` runs the `ferry` command (the tests start the daemon this way)."""

import sys

from daemon.cli.ferry import main

sys.exit(main())
