"""Training side: distributed context, trainer, data, checkpoints. Never imports ``orchestrator``."""

__version__ = "0.1.0"
