"""``python -m dualsn``: the command line of :mod:`dualsn.cli`."""

import sys

from dualsn.cli import main

sys.exit(main())
