"""Fixtures for the unlearning-method tests: synthetic 4-class data and two tiny trained nets, an MLP and a
small 1-D conv net with BatchNorm (so train/eval-mode behaviour is exercised). Everything trains in well under
a second."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unlearning.base import UnlearnData

N_TRAIN = 96
N_FEATURES = 16
N_CLASSES = 4


def make_blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class blobs in 16 dimensions, with enough overlap that the nets do not all saturate."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(1234)) * 0.5
    y = torch.arange(n) % N_CLASSES
    x = centres[y] + torch.randn(n, N_FEATURES, generator=g)
    return x, y


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def make_conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 6, 3, padding=1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, stride=2, padding=1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * N_FEATURES // 2, N_CLASSES),
    )


def train(
    model: nn.Module, data: UnlearnData, steps: int = 150, lr: float = 1e-2, seed: int = 0
) -> nn.Module:
    """Full-batch Adam on cross-entropy; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x), data.y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    # The team shares 2 cores: keep each test to one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mlp_data() -> UnlearnData:
    x, y = make_blobs(N_TRAIN, seed=0)
    return UnlearnData(x, y)


@pytest.fixture(scope="session")
def conv_data(mlp_data) -> UnlearnData:
    return UnlearnData(mlp_data.x.unsqueeze(1), mlp_data.y)


@pytest.fixture(scope="session")
def trained_mlp(mlp_data) -> nn.Module:
    return train(make_mlp(0), mlp_data)


@pytest.fixture(scope="session")
def trained_conv_bn(conv_data) -> nn.Module:
    return train(make_conv_bn(0), conv_data, steps=100)


@pytest.fixture(params=["mlp", "conv_bn"])
def net_and_data(request, trained_mlp, trained_conv_bn, mlp_data, conv_data):
    """(model, data) for each tiny net; tests must treat both as read-only."""
    return (trained_mlp, mlp_data) if request.param == "mlp" else (trained_conv_bn, conv_data)


@pytest.fixture
def forget_idx() -> torch.Tensor:
    return torch.tensor([3, 10, 17, 22, 41, 58, 77, 90])


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (BatchNorm running statistics included)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), f"{k} changed"


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()
