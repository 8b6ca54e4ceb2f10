"""The three regularisers of the method: L_aux (load balance), L_o (orthogonality), L_v (variance)."""
from .aux import AUX_VARIANTS, aux_loss_backward, aux_loss_forward
from .ortho import ORTHO_VARIANTS, ortho_loss_backward, ortho_loss_forward
from .variance import VAR_VARIANTS, var_loss_backward, var_loss_forward

__all__ = ["AUX_VARIANTS", "aux_loss_forward", "aux_loss_backward",
           "ORTHO_VARIANTS", "ortho_loss_forward", "ortho_loss_backward",
           "VAR_VARIANTS", "var_loss_forward", "var_loss_backward"]
