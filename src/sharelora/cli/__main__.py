"""``python -m sharelora.cli``: the same as ``sharelora`` (and ``python -m sharelora``)."""

import sys

from . import main

sys.exit(main())
