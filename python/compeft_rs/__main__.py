"""`python -m compeft_rs`: the `compeft` command line tool."""

import sys

from .cli import main

sys.exit(main())
