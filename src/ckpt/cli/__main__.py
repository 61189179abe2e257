"""``python -m ckpt.cli``: the same as the ``ckpt`` console script."""

import sys

from ckpt.cli.main import main

sys.exit(main())
