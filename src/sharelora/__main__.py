"""``python -m sharelora``: the ``sharelora`` command, so that launchers can start it as a module.

    torchrun --nproc-per-node 8 -m sharelora train ...
    accelerate launch -m sharelora train ...
"""

import sys

from .cli import main

sys.exit(main())
