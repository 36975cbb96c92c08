"""``python -m cliptuner.cli``: the same as the ``cliptuner`` command."""

import sys

from cliptuner.cli import main

sys.exit(main())
