"""``python -m deltatune.bench``: the same as ``deltatune bench``."""

import sys

from deltatune.bench.cli import main

sys.exit(main())
