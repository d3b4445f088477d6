"""Reading and validating job bundles (TOML → :class:`Bundle`); pure, no cluster needed."""

from pilotflow.bundle.fit import task_fits, task_nodes, unfit
from pilotflow.bundle.load import bundle_from_dict, load_bundle, load_resources, load_resources_file, read_toml
from pilotflow.bundle.model import (DEFAULT_BATCH_MAX_WALLTIME_S, DEFAULT_LOCK_TIMEOUT_S, DEFAULT_WALLTIME_S,
                                    Bundle, Resource, Task, local_resource)

__all__ = ["Bundle", "DEFAULT_BATCH_MAX_WALLTIME_S", "DEFAULT_LOCK_TIMEOUT_S", "DEFAULT_WALLTIME_S", "Resource",
           "Task", "bundle_from_dict", "load_bundle", "load_resources", "load_resources_file", "local_resource",
           "read_toml", "task_fits", "task_nodes", "unfit"]
