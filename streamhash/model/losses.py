"""Training losses as small ``nn.Module`` classes (pytorch-metric-learning style).

Every loss is a :class:`HashLoss`: built for a code length, it checks the relaxed codes it is given
and hands them to ``compute_loss``, which is all a new loss writes.

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

Two entry points compute the same number:

* :meth:`DIHNLoss.forward` takes the dense similarity block ``S`` (batch x |Gamma|) and ``B``;
* :meth:`DIHNLoss.grouped` takes the sufficient statistics ``SB = S @ B`` (batch x c), ``BtB = B^T B``
  (c x c) and ``s2 = sum_j S_ij^2`` (batch,), which the learner gets from label-set groups without
  ever building S — the per-round cost is then independent of |Gamma| apart from one pass over B.

``MIHashLoss`` — the differentiable mutual information of MIHash (Cakir et al., ICCV 2017): per
anchor, Hamming distances to the other batch items are soft-binned with triangular kernels into
``bins`` bins over [0, c]; the loss is minus the mean over anchors of
``H(D) - P(+)H(D|+) - P(-)H(D|-)``. With +-1 codes and ``bins = c + 1`` it equals the exact MI of
:func:`streamhash.learn.mi.mi_per_anchor`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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


class HashLoss(nn.Module, ABC):
    """A loss on relaxed codes ``u`` (m, bits): ``loss(u, ...)`` checks ``u`` and returns ``compute_loss(u, ...)``."""

    def __init__(self, bits: int):
        super().__init__()
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        self.bits = bits

    def check_codes(self, u: torch.Tensor) -> None:
        # A code length mismatch broadcasts silently in most of the algebra below; fail loudly instead.
        if u.ndim != 2 or u.shape[1] != self.bits:
            raise ValueError(f"{type(self).__name__} expects codes of shape (m, {self.bits}), got {tuple(u.shape)}")

    def forward(self, u: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        self.check_codes(u)
        return self.compute_loss(u, *args)

    @abstractmethod
    def compute_loss(self, u: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        """The loss (a scalar) of relaxed codes ``u`` given the loss's other inputs."""


class DIHNLoss(HashLoss):
    def __init__(self, bits: int, gamma: float = 200.0, mu: float = 50.0, balance: str = "square"):
        super().__init__(bits)
        if balance not in ("square", "linear"):
            raise ValueError("balance must be 'square' (paper) or 'linear' (released code)")
        self.gamma = float(gamma)
        self.mu = float(mu)
        self.balance = balance

    def _balance(self, u: torch.Tensor) -> torch.Tensor:
        s = u.sum(dim=1)
        return (s * s).sum() if self.balance == "square" else s.sum()

    def compute_loss(self, u: torch.Tensor, B: torch.Tensor, S: torch.Tensor, b_self: torch.Tensor) -> torch.Tensor:
        """u (m, c) relaxed codes; B (n, c) +-1 database codes; S (m, n); b_self (m, c) the rows' own codes."""
        hash_loss = ((self.bits * S - u @ B.t()) ** 2).sum()
        quant = ((u - b_self) ** 2).sum()
        return (hash_loss + self.gamma * quant + self.mu * self._balance(u)) / (u.shape[0] * B.shape[0])

    def grouped(
        self, u: torch.Tensor, SB: torch.Tensor, BtB: torch.Tensor, s2: torch.Tensor, b_self: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Same value as :meth:`compute_loss` from ``SB = S @ B``, ``BtB = B^T B``, ``s2 = (S**2).sum(1)``, n = |Gamma|.

        sum_j (c S_ij - u_i^T b_j)^2 = c^2 s2_i - 2c u_i^T SB_i + u_i^T BtB u_i.
        """
        self.check_codes(u)
        c = self.bits
        hash_loss = (c * c * s2).sum() - 2.0 * c * (u * SB).sum() + ((u @ BtB) * u).sum()
        quant = ((u - b_self) ** 2).sum()
        return (hash_loss + self.gamma * quant + self.mu * self._balance(u)) / (u.shape[0] * n)


def triangular_histogram(d: torch.Tensor, bins: int, max_value: float) -> torch.Tensor:
    """Soft histogram weights (..., bins) of values d in [0, max_value] with triangular kernels.

    Bin centres ``l * delta``, ``delta = max_value / (bins - 1)``; weight ``max(0, 1 - |d - l delta| / delta)``.
    Each value's weights sum to 1, and an exact bin centre puts all its mass in that bin.
    """
    delta = max_value / (bins - 1)
    centres = torch.arange(bins, dtype=d.dtype, device=d.device) * delta
    return torch.clamp(1.0 - (d.unsqueeze(-1) - centres).abs() / delta, min=0.0)


def _entropy(p: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=-1)


class MIHashLoss(HashLoss):
    """Minus the mean (over anchors in the batch) differentiable mutual information I(D; C)."""

    def __init__(self, bits: int, bins: int | None = None):
        super().__init__(bits)
        self.bins = bins or bits + 1

    def mutual_information(self, u: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """u (m, c) relaxed codes, S (m, m) bool neighbour matrix -> MI per anchor (m,) in nats.

        The anchor itself is excluded. Anchors with no neighbours or no non-neighbours have MI 0.
        """
        self.check_codes(u)
        m, c = u.shape
        d = 0.5 * (c - u @ u.t())  # Hamming distance for +-1 codes, a smooth surrogate otherwise
        w = triangular_histogram(d, self.bins, float(c))  # (m, m, bins)
        eye = torch.eye(m, dtype=torch.bool, device=u.device)
        pos = (S.bool() & ~eye).to(u.dtype)
        neg = (~S.bool() & ~eye).to(u.dtype)
        n_pos = pos.sum(1)
        n_neg = neg.sum(1)
        h_pos = (w * pos.unsqueeze(-1)).sum(1)  # (m, bins) counts
        h_neg = (w * neg.unsqueeze(-1)).sum(1)
        total = (n_pos + n_neg).clamp_min(1.0)
        p_all = (h_pos + h_neg) / total.unsqueeze(1)
        p_pos = h_pos / n_pos.clamp_min(1.0).unsqueeze(1)
        p_neg = h_neg / n_neg.clamp_min(1.0).unsqueeze(1)
        mi = _entropy(p_all) - (n_pos / total) * _entropy(p_pos) - (n_neg / total) * _entropy(p_neg)
        valid = (n_pos > 0) & (n_neg > 0)
        return torch.where(valid, mi, torch.zeros_like(mi))

    def compute_loss(self, u: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        return -self.mutual_information(u, S).mean()
