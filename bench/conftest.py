import pytest
import torch


@pytest.fixture(autouse=True)
def two_threads():
    """CPU figures are quoted for this project's 2-core machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
