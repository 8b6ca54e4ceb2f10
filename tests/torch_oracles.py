"""PyTorch transcriptions of released code, used as independent oracles by the tests (torch is passed in,
so that importing this module never requires it)."""


def released_span_total(torch, vecs, n_slots: int):
    """Sum over the first ``n_slots`` slots i of vecs [rows, S, D] of the squared projection of vecs[:, i] on the
    span of the other S - 1 slots, with the released Gram-Schmidt basis v / (||v|| + 1e-6); no normalisation."""
    total = 0.0
    for i in range(n_slots):
        others = torch.cat([vecs[:, :i], vecs[:, i + 1:]], dim=1)
        basis = []
        for j in range(others.size(1)):
            v = others[:, j]
            for u in basis:
                v = v - (u * v).sum(dim=-1, keepdim=True) * u
            basis.append(v / (torch.norm(v, dim=-1, keepdim=True) + 1e-6))
        for u in basis:
            total = total + torch.sum(((u * vecs[:, i]).sum(dim=-1, keepdim=True) * u) ** 2)
    return total
