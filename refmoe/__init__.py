"""refmoe: a reference Mixture-of-Experts layer with hand-derived gradients, on NumPy or CuPy."""
from .backend import array_namespace, backend_name, cupy_available, get_xp, to_backend, to_numpy
from .config import MoEConfig
from .layer import MoECache, init_params, moe_backward, moe_forward, param_shapes
from .losses import AUX_VARIANTS, aux_loss_backward, aux_loss_forward
from .losses import ORTHO_VARIANTS, ortho_loss_backward, ortho_loss_forward
from .losses import VAR_VARIANTS, var_loss_backward, var_loss_forward
from . import gradcheck
from .objective import (PRESETS, Objective, ObjectiveCache, ObjectiveResult, get_objective, objective_backward,
                        objective_forward, objective_forward_backward)
from .autoscale import AutoscaleReport, autoscale_weights
from .systems import SYSTEMS, System, system_config

__version__ = "0.1.0"

__all__ = [
    "MoEConfig", "MoECache", "init_params", "moe_forward", "moe_backward", "param_shapes",
    "aux_loss_forward", "aux_loss_backward", "AUX_VARIANTS",
    "ortho_loss_forward", "ortho_loss_backward", "ORTHO_VARIANTS",
    "var_loss_forward", "var_loss_backward", "VAR_VARIANTS",
    "Objective", "ObjectiveCache", "ObjectiveResult", "PRESETS", "get_objective", "objective_forward_backward",
    "objective_forward", "objective_backward",
    "AutoscaleReport", "autoscale_weights",
    "SYSTEMS", "System", "system_config",
    "gradcheck", "get_xp", "backend_name", "array_namespace", "to_numpy", "to_backend", "cupy_available",
    "__version__",
]
