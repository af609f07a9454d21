import pytest

from ekko.store import warm


@pytest.fixture(scope="session", autouse=True)
def _warm_kernels() -> None:
    warm()
