"""``python -m workers CONFIG.yaml [key=value ...]`` — the worker entry for torchrun and srun."""

import sys

from workers.entry import main

sys.exit(main())
