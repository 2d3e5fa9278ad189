"""The run's config: one frozen, typed tree, loaded from YAML plus dotted overrides and validated once.

- :mod:`workers.config.schema`: the tree (nested frozen dataclasses) and each field's check;
- :mod:`workers.config.loader`: YAML, overrides, type coercion, did-you-mean;
- :mod:`workers.config.plan`: values derived with the world size (:class:`BatchPlan`) and resume compatibility;
- :mod:`workers.config.diff`: the keys two configs differ in (told at a resume).

Torch-free, so config errors are found before torch is imported. Imports only the base layer (errors, contract).
"""

from workers.config.diff import config_changes
from workers.config.loader import config_from_dict, dump_config, load_config
from workers.config.plan import (
    BatchPlan,
    check_node_range,
    check_not_past_the_end,
    check_resume_compatible,
    plan_batches,
)
from workers.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    LaunchConfig,
    OptimConfig,
    RunConfig,
    SlurmConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)
from workers.errors import ConfigError

__all__ = [
    "BatchPlan", "Config", "ConfigError", "DataConfig", "EvalConfig", "LaunchConfig", "OptimConfig", "RunConfig",
    "SlurmConfig", "TaskConfig", "TrackingConfig", "TrainConfig", "check_node_range", "check_not_past_the_end",
    "check_resume_compatible",
    "config_changes", "config_from_dict", "dump_config", "load_config", "plan_batches",
]  # fmt: skip
