"""``python -m dualsn.cli``: the same as ``python -m dualsn``."""

import sys

from dualsn.cli import main

sys.exit(main())
