"""``python -m workers CONFIG.yaml [key=value ...]`` — the worker entry for torchrun and srun."""

from workers.entry import exit_now, main

exit_now(main())
