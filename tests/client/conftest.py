from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_node import Source, source_node


@pytest.fixture(scope="package")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    yield from source_node(tmp_path_factory)
