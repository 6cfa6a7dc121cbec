"""DIHN's B-step: discrete cyclic coordinate descent on the new codes, and the statistics of the
Omega x Gamma similarity block it and the network's loss need, from label-set groups.

Similarity is multi-label: S_ij = +1 iff the label sets intersect, else -1 (or DIHN's "soft" negative,
see :func:`streamhash.model.losses.soft_negative`). Nothing of size |Omega| x |Gamma| is built: items are
grouped by label set, and ``S @ B`` is ``S_groups @ (sum of codes per group)``, so a round costs
O(|Gamma| c^2) for ``B^T B`` plus work on Omega and B_new only. Label values only name labels: the
group statistics use one column per label that occurs, so a label 10**20 costs what a label 3 does.
The Gamma sums are accumulated a chunk of rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from streamhash.model.losses import soft_negative


def group_stats(sets: list[frozenset[int]], lab_rows: np.ndarray, groups: np.ndarray, g_omega: np.ndarray,
                pm1: Callable[[np.ndarray], np.ndarray], bits: int, *, soft: bool, chunk: int) -> dict:
    """Sufficient statistics of the Omega x Gamma similarity block from label-set groups.

    ``sets``: the label set of each group; ``lab_rows``: Gamma's rows and ``groups`` their groups;
    ``g_omega``: Omega's groups; ``pm1(rows)``: (len(rows), bits) float32 +-1 codes, asked ``chunk``
    rows at a time. Returns the (G, G) similarity ``Sg``, per group ``SB`` (G, c) = sum_j S(g, g_j) b_j
    and ``s2`` (G,) = sum_j S(g, g_j)^2, ``BtB``, Gamma's size ``n`` and the negative similarity ``s_neg``.
    """
    G = len(sets)
    cnt = np.bincount(groups, minlength=G).astype(np.float64)
    # Sums of +-1 are integers: exact in float64 at any |Gamma|, so the float32 results are
    # those of a single float32 pass over all of Gamma (exact below 2**24 rows) without its memory.
    bsum = torch.zeros(G, bits, dtype=torch.float64)
    BtB = torch.zeros(bits, bits, dtype=torch.float64)
    for a in range(0, len(lab_rows), chunk):
        B = torch.from_numpy(pm1(lab_rows[a : a + chunk]))
        bsum.index_add_(0, torch.from_numpy(groups[a : a + chunk].astype(np.int64)), B.double())
        BtB += (B.t() @ B).double()
    bsum, BtB = bsum.float(), BtB.float()
    column = {lab: c for c, lab in enumerate(sorted(set().union(*sets)))}  # labels that occur
    hot = np.zeros((G, len(column)), np.float32)
    for g, s in enumerate(sets):
        hot[g, [column[lab] for lab in s]] = 1.0
    inter = (hot @ hot.T) > 0  # (G, G) label sets intersect
    n_pos = float((inter[g_omega].astype(np.float64) @ cnt).sum())
    n_neg = float(len(g_omega)) * len(lab_rows) - n_pos
    s_neg = soft_negative(n_pos, n_neg) if soft else -1.0
    Sg = np.where(inter, 1.0, s_neg).astype(np.float32)  # (G, G)
    SB = torch.from_numpy(Sg) @ bsum  # (G, c): row g = sum_j S(g, g_j) b_j
    s2 = torch.from_numpy(((Sg.astype(np.float64) ** 2) @ cnt).astype(np.float32))  # (G,)
    return {"Sg": torch.from_numpy(Sg), "SB": SB, "s2": s2, "BtB": BtB, "n": len(lab_rows), "s_neg": s_neg}


def dcc_new_codes(B: torch.Tensor, U: torch.Tensor, Sg: torch.Tensor, g_new: np.ndarray, g_omega: np.ndarray,
                  new_rows: np.ndarray, omega_rows: np.ndarray, gamma: float) -> torch.Tensor:
    """B_new after one DCC sweep (int8 +-1): ``B`` the current +-1 (float64) codes of ``new_rows``, ``U``
    the network's outputs on ``omega_rows`` (both row lists sorted and duplicate-free), ``Sg`` the group
    similarity of :func:`group_stats`, ``g_new`` / ``g_omega`` the rows' groups.
    ``Q = c S_{Omega,new}^T U + gamma U_bar``, U_bar = u_i for new items that are in Omega, 0 else."""
    bits = B.shape[1]
    usum = torch.zeros(len(Sg), bits, dtype=torch.float64).index_add_(0, torch.from_numpy(g_omega.astype(np.int64)), U)
    W = Sg.double() @ usum  # (G, c): row g = sum_{i in Omega} S(g_i, g) u_i
    Q = bits * W[torch.from_numpy(g_new.astype(np.int64))]
    # U_bar: Omega members that are new items (both row lists are sorted and duplicate-free)
    k = np.minimum(np.searchsorted(new_rows, omega_rows), len(new_rows) - 1)
    hit = new_rows[k] == omega_rows
    Q[torch.from_numpy(k[hit])] += gamma * U[torch.from_numpy(np.flatnonzero(hit))]
    return dcc_update(B, Q, U)


def dcc_update(B: torch.Tensor, Q: torch.Tensor, U: torch.Tensor, sweeps: int = 1) -> torch.Tensor:
    """Discrete cyclic coordinate descent on min_B ||U B^T||^2 - 2 tr(B Q^T), B in {-1,+1}^(n x c).

    That is the B_new-subproblem of ``||c S - U B^T||^2 + gamma ||U_new - B_new||^2`` with
    ``Q = c S^T U + gamma U_bar``. Bit k: ``B[:, k] = sign(Q[:, k] - B_{-k} (U_{-k}^T u_k))``; where the
    argument is exactly 0 both values tie and the current bit is kept. Returns int8 codes.
    """
    B = B.clone().double()
    Q = Q.double()
    UtU = U.double().t() @ U.double()
    c = B.shape[1]
    for _ in range(sweeps):
        for k in range(c):
            v = Q[:, k] - B @ UtU[:, k] + B[:, k] * UtU[k, k]
            B[:, k] = torch.where(v > 0, 1.0, torch.where(v < 0, -1.0, B[:, k]))
    return B.to(torch.int8)
