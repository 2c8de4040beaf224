"""``python -m repif`` is the ``repif`` command."""

import sys

from repif.cli import main

sys.exit(main())
