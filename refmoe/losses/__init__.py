"""The regularisers of the method: L_aux (load balance), L_o (orthogonality), L_v (variance), the other systems'
balancing losses (``aux_systems``) and the router z-loss, and the one
dispatch from (term, form) to a loss on the layer's cache (:mod:`refmoe.losses.terms`).

Each registry is a literal table, form name -> what defines the form.
"""
from .aux import AUX_VARIANTS, aux_loss_backward, aux_loss_forward
from .ortho import ORTHO_VARIANTS, ortho_loss_backward, ortho_loss_forward
from .variance import VAR_VARIANTS, var_loss_backward, var_loss_forward
from .aux_systems import SYSTEM_AUX_FORMS, system_aux_backward, system_aux_forward
from .zloss import zloss_backward, zloss_forward
from .terms import TERM_FORMS, term_backward, term_forward

__all__ = ["AUX_VARIANTS", "aux_loss_forward", "aux_loss_backward",
           "ORTHO_VARIANTS", "ortho_loss_forward", "ortho_loss_backward",
           "VAR_VARIANTS", "var_loss_forward", "var_loss_backward",
           "SYSTEM_AUX_FORMS", "system_aux_forward", "system_aux_backward", "zloss_forward", "zloss_backward",
           "TERM_FORMS", "term_forward", "term_backward"]
