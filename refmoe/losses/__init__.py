"""The regularisers of the method: L_aux (load balance), L_o (orthogonality), L_v (variance), the other systems'
balancing losses (``aux_systems``) and the router z-loss, and the one
dispatch from (term, form) to a loss on the layer's cache (:mod:`refmoe.losses.terms`).

Every form also says which sums over the batch it normalises by (``*_totals``): given those sums over a whole
global batch (``totals=``), a rank of a data-parallel group computes its share of the global-batch loss
(``refmoe.distributed``).

Each registry is a literal table, form name -> what defines the form.
"""
from .aux import AUX_VARIANTS, aux_loss_backward, aux_loss_forward, aux_loss_totals
from .ortho import ORTHO_VARIANTS, ortho_loss_backward, ortho_loss_forward, ortho_loss_totals
from .variance import VAR_VARIANTS, var_loss_backward, var_loss_forward, var_loss_totals
from .aux_systems import SYSTEM_AUX_FORMS, system_aux_backward, system_aux_forward, system_aux_totals
from .zloss import zloss_backward, zloss_forward, zloss_totals
from .terms import TERM_FORMS, term_backward, term_forward, term_totals

__all__ = ["AUX_VARIANTS", "aux_loss_forward", "aux_loss_backward", "aux_loss_totals",
           "ORTHO_VARIANTS", "ortho_loss_forward", "ortho_loss_backward", "ortho_loss_totals",
           "VAR_VARIANTS", "var_loss_forward", "var_loss_backward", "var_loss_totals",
           "SYSTEM_AUX_FORMS", "system_aux_forward", "system_aux_backward", "system_aux_totals",
           "zloss_forward", "zloss_backward", "zloss_totals",
           "TERM_FORMS", "term_forward", "term_backward", "term_totals"]
