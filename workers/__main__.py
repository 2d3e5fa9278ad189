"""``python -m workers CONFIG.yaml [key=value ...]`` — the worker entry for torchrun and srun."""

from workers.entry import exit_now, main

if __name__ == "__main__":  # not when a spawned helper re-imports the main module
    exit_now(main())
