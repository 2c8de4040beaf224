"""``python -m repif`` is the ``repif`` command; under ``torchrun`` (``torchrun
--nproc_per_node=N -m repif …``) every process joins one process group and shares the work."""

import sys

from repif.cli import main
from repif.distributed import run_launched

sys.exit(run_launched(main))
