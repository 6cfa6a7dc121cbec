import pytest
import torch

from streamhash.model.losses import DIHNLoss, similarity_pm1, soft_negative, soft_similarity


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
    fast = loss(u1, *DIHNLoss.statistics(S, B), B[omega_rows])
    ref = brute_dihn(u2, B, S, omega_rows, c, 3.0, 0.5, balance)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-10)
    fast.backward()
    ref.backward()
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-9, atol=1e-12)


def test_dihn_gradient_finite_differences():
    g = torch.Generator().manual_seed(1)
    c, n, m = 4, 5, 3
    B = torch.randint(0, 2, (n, c), generator=g).double() * 2 - 1
    S = torch.randint(0, 2, (m, n), generator=g).double() * 2 - 1
    u = torch.tanh(torch.randn(m, c, generator=g)).requires_grad_(True)
    loss = DIHNLoss(c, gamma=2.0, mu=1.0)
    loss(u, *DIHNLoss.statistics(S, B), B[:m]).backward()
    eps = 1e-6
    num = torch.zeros_like(u)
    for i in range(m):
        for k in range(c):
            up, dn = u.detach().clone(), u.detach().clone()
            up[i, k] += eps
            dn[i, k] -= eps
            num[i, k] = (loss(up, *DIHNLoss.statistics(S, B), B[:m]) - loss(dn, *DIHNLoss.statistics(S, B), B[:m])) / (2 * eps)
    torch.testing.assert_close(u.grad, num, rtol=1e-5, atol=1e-8)


def test_soft_similarity_sums_to_zero():
    S = torch.tensor([[1.0, -1, -1, -1], [-1, 1, -1, -1]])
    soft = soft_similarity(S)
    assert soft.sum().item() == pytest.approx(0.0, abs=1e-12)
    assert soft[S > 0].eq(1).all()
    assert soft_negative(3, 0) == -1.0


def test_the_loss_refuses_codes_of_another_shape():
    g = torch.Generator().manual_seed(2)
    u = torch.tanh(torch.randn(4, 8, generator=g))
    B = torch.randint(0, 2, (5, 8), generator=g).double() * 2 - 1
    S = torch.randint(0, 2, (4, 5), generator=g).double() * 2 - 1
    loss = DIHNLoss(8)
    for wrong in (u[:, :6], u[0]):  # another code length, or one code without its batch axis
        with pytest.raises(ValueError, match=r"codes of shape \(m, 8\)"):
            loss(wrong, *DIHNLoss.statistics(S[:, :], B[:, : wrong.shape[-1]]), B[:4, : wrong.shape[-1]])
    with pytest.raises(ValueError, match="balance"):
        DIHNLoss(8, balance="cubic")
