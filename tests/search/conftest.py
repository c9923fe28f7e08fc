import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One BLAS thread in every search test module: bit-exact comparisons need one thread count throughout (MKL
    rounds differently across counts), and small matrices on a shared, loaded machine avoid spin-wait stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
