import math

import numpy as np
import pytest
import torch

from streamhash.learn.mi import mi_per_anchor
from streamhash.model.losses import DIHNLoss, HashLoss, MIHashLoss, similarity_pm1, soft_negative, soft_similarity


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def brute_dihn(u, B, S, omega_rows, c, gamma, mu, balance):
    total = 0.0
    m, n = S.shape
    for i in range(m):
        for j in range(n):
            total = total + (c * S[i, j] - sum(u[i, k] * B[j, k] for k in range(c))) ** 2
    for i in range(m):
        for k in range(c):
            total = total + gamma * (u[i, k] - B[omega_rows[i], k]) ** 2
    for i in range(m):
        s = sum(u[i, k] for k in range(c))
        total = total + mu * (s * s if balance == "square" else s)
    return total / (m * n)


@pytest.mark.parametrize("balance", ["square", "linear"])
def test_dihn_loss_and_gradient_match_brute_force(balance):
    g = torch.Generator().manual_seed(0)
    c, n, m = 8, 7, 4
    B = torch.randint(0, 2, (n, c), generator=g).double() * 2 - 1
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1]])
    omega_rows = [0, 2, 3, 6]
    S = soft_similarity(similarity_pm1(labels[omega_rows], labels)).double()
    raw = torch.randn(m, c, generator=g)
    u1 = torch.tanh(raw).requires_grad_(True)
    u2 = torch.tanh(raw).requires_grad_(True)
    loss = DIHNLoss(c, gamma=3.0, mu=0.5, balance=balance)
    fast = loss(u1, B, S, B[omega_rows])
    ref = brute_dihn(u2, B, S, omega_rows, c, 3.0, 0.5, balance)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-10)
    fast.backward()
    ref.backward()
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-9, atol=1e-12)
    # grouped form from sufficient statistics gives the same value and gradient
    u3 = torch.tanh(raw).requires_grad_(True)
    grouped = loss.grouped(u3, S @ B, B.t() @ B, (S ** 2).sum(1), B[omega_rows], n)
    assert grouped.item() == pytest.approx(ref.item(), rel=1e-10)
    grouped.backward()
    torch.testing.assert_close(u3.grad, u2.grad, rtol=1e-9, atol=1e-12)


def test_dihn_gradient_finite_differences():
    g = torch.Generator().manual_seed(1)
    c, n, m = 4, 5, 3
    B = torch.randint(0, 2, (n, c), generator=g).double() * 2 - 1
    S = torch.randint(0, 2, (m, n), generator=g).double() * 2 - 1
    u = torch.tanh(torch.randn(m, c, generator=g)).requires_grad_(True)
    loss = DIHNLoss(c, gamma=2.0, mu=1.0)
    loss(u, B, S, B[:m]).backward()
    eps = 1e-6
    num = torch.zeros_like(u)
    for i in range(m):
        for k in range(c):
            up, dn = u.detach().clone(), u.detach().clone()
            up[i, k] += eps
            dn[i, k] -= eps
            num[i, k] = (loss(up, B, S, B[:m]) - loss(dn, B, S, B[:m])) / (2 * eps)
    torch.testing.assert_close(u.grad, num, rtol=1e-5, atol=1e-8)


def test_soft_similarity_sums_to_zero():
    S = torch.tensor([[1.0, -1, -1, -1], [-1, 1, -1, -1]])
    soft = soft_similarity(S)
    assert soft.sum().item() == pytest.approx(0.0, abs=1e-12)
    assert soft[S > 0].eq(1).all()
    assert soft_negative(3, 0) == -1.0


def test_mihash_loss_equals_exact_mi_on_binary_codes():
    rng = np.random.default_rng(0)
    c = 8
    pm1 = rng.choice([-1.0, 1.0], size=(12, c))
    labels = rng.integers(0, 3, 12)
    packed = np.packbits(pm1 >= 0, axis=1)
    exact = mi_per_anchor(packed, labels, c)
    S = torch.from_numpy(labels[:, None] == labels[None, :])
    soft = MIHashLoss(c).mutual_information(torch.from_numpy(pm1), S).numpy()
    np.testing.assert_allclose(soft, exact, atol=1e-9)
    # differentiable: gradients flow to relaxed codes
    u = torch.tanh(torch.from_numpy(pm1) * 0.7).requires_grad_(True)
    MIHashLoss(c)(u, S).backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    assert math.isfinite(MIHashLoss(c, bins=5)(u, S).item())


def test_every_loss_is_a_hash_loss_checking_its_codes():
    g = torch.Generator().manual_seed(2)
    u = torch.tanh(torch.randn(4, 8, generator=g))
    B = torch.randint(0, 2, (5, 8), generator=g).double() * 2 - 1
    S = torch.randint(0, 2, (4, 5), generator=g).double() * 2 - 1
    dihn, mih = DIHNLoss(8), MIHashLoss(8)
    assert isinstance(dihn, HashLoss) and isinstance(mih, HashLoss)
    assert dihn(u, B, S, B[:4]).item() == dihn.compute_loss(u, B, S, B[:4]).item()
    for wrong in (u[:, :6], u[0]):  # another code length, or one code without its batch axis
        with pytest.raises(ValueError, match=r"codes of shape \(m, 8\)"):
            dihn(wrong, B[:, : wrong.shape[-1]], S, B[:4, : wrong.shape[-1]])
        with pytest.raises(ValueError, match=r"codes of shape \(m, 8\)"):
            dihn.grouped(wrong, S @ B, B.t() @ B, (S**2).sum(1), B[:4], 5)
        with pytest.raises(ValueError, match=r"codes of shape \(m, 8\)"):
            mih(wrong, torch.eye(len(wrong), dtype=torch.bool))


def test_a_new_loss_writes_only_compute_loss():
    class MeanSquare(HashLoss):
        def compute_loss(self, u, target):
            return ((u - target) ** 2).mean()

    u = torch.zeros(3, 4, requires_grad=True)
    loss = MeanSquare(4)(u, torch.ones(3, 4))
    loss.backward()
    assert loss.item() == 1.0 and u.grad.shape == (3, 4)
    with pytest.raises(ValueError):
        MeanSquare(4)(torch.zeros(3, 5), torch.ones(3, 5))
    with pytest.raises(TypeError):
        HashLoss(4)  # abstract: a loss without compute_loss cannot be built
