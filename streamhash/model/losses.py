"""The training loss, an ``nn.Module`` tested against a brute-force computation (pytorch-metric-learning style).

``DIHNLoss`` — the asymmetric loss of DIHN (Wu et al., CVPR 2019), also ADSH's when every
database code is learnable::

    J = sum_{i in Omega, j in Gamma} (c*S_ij - u_i^T b_j)^2
        + gamma * sum_{i in Omega} ||u_i - b_i||^2
        + mu * balance(u)

``u_i = tanh(F(x_i))`` are relaxed codes of the sampled items Omega, ``b_j`` the +-1 database codes of
the labeled database Gamma, ``c`` the number of bits and ``S`` in {+1, -1} (optionally "soft", see
:func:`soft_similarity`). The bit-balance term follows the paper, ``sum_i (u_i^T 1)^2``
(``balance="square"``, default); the authors' released code uses the linear ``sum_i u_i^T 1``
(``balance="linear"``), kept as an option. Like the released code the total is divided by
``|batch| * |Gamma|`` so the learning rate does not depend on the database size.

The loss takes the sufficient statistics of the similarity block, ``SB = S @ B`` (batch x c),
``BtB = B^T B`` (c x c) and ``s2 = sum_j S_ij^2`` (batch,), which the learner gets from label-set groups
without ever building S — the per-round cost is then independent of |Gamma| apart from one pass over B.
:meth:`DIHNLoss.statistics` computes them from a dense ``S`` and ``B``.

One loss, so no loss base class: a second one would share this one's inputs, or it would be called
differently and a base would only pretend otherwise. (MIHash's differentiable MI, never trained with,
went for that reason; the re-encode test computes the exact MI, :mod:`streamhash.learn.mi`.)
"""

from __future__ import annotations

import torch
from torch import nn


def similarity_pm1(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Multi-hot label matrices (na, C), (nb, C) -> S in {+1, -1}: +1 iff the label sets intersect."""
    inter = labels_a.float() @ labels_b.float().t()
    return torch.where(inter > 0, torch.ones_like(inter), -torch.ones_like(inter))


def soft_negative(n_pos: float, n_neg: float) -> float:
    """Value given to dissimilar pairs by DIHN/ADSH's "soft" similarity.

    The released code rescales S (+-1) by ``S*(1+r) - r`` with ``r = sum(S) / sum(1-S)``: positives
    stay 1, negatives become ``-1 - 2r``, which makes ``sum(S) = 0`` on the Omega x Gamma block.
    With no negatives the rescaling is the identity.
    """
    if n_neg <= 0:
        return -1.0
    r = (n_pos - n_neg) / (2.0 * n_neg)
    return -1.0 - 2.0 * r


def soft_similarity(S: torch.Tensor) -> torch.Tensor:
    """Dense version of :func:`soft_negative` for an S in {+1, -1}."""
    n_pos = float((S > 0).sum())
    n_neg = float((S < 0).sum())
    return torch.where(S > 0, S, torch.full_like(S, soft_negative(n_pos, n_neg)))


class DIHNLoss(nn.Module):
    def __init__(self, bits: int, gamma: float = 200.0, mu: float = 50.0, balance: str = "square"):
        super().__init__()
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        if balance not in ("square", "linear"):
            raise ValueError("balance must be 'square' (paper) or 'linear' (released code)")
        self.bits = bits
        self.gamma = float(gamma)
        self.mu = float(mu)
        self.balance = balance

    def _balance(self, u: torch.Tensor) -> torch.Tensor:
        s = u.sum(dim=1)
        return (s * s).sum() if self.balance == "square" else s.sum()

    @staticmethod
    def statistics(S: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(SB, BtB, s2, n)`` of a dense similarity block S (m, n) and +-1 database codes B (n, c)."""
        return S @ B, B.t() @ B, (S**2).sum(1), B.shape[0]

    def forward(self, u: torch.Tensor, SB: torch.Tensor, BtB: torch.Tensor, s2: torch.Tensor, n: int,
                b_self: torch.Tensor) -> torch.Tensor:
        """u (m, c) relaxed codes; ``SB = S @ B``, ``BtB = B^T B``, ``s2 = (S**2).sum(1)``, n = |Gamma|;
        b_self (m, c) the rows' own database codes.

        sum_j (c S_ij - u_i^T b_j)^2 = c^2 s2_i - 2c u_i^T SB_i + u_i^T BtB u_i.
        """
        # A code length mismatch broadcasts silently in most of the algebra below; fail loudly instead.
        if u.ndim != 2 or u.shape[1] != self.bits:
            raise ValueError(f"{type(self).__name__} expects codes of shape (m, {self.bits}), got {tuple(u.shape)}")
        c = self.bits
        hash_loss = (c * c * s2).sum() - 2.0 * c * (u * SB).sum() + ((u @ BtB) * u).sum()
        quant = ((u - b_self) ** 2).sum()
        return (hash_loss + self.gamma * quant + self.mu * self._balance(u)) / (u.shape[0] * n)
