"""Public publisher API: wrap any torch model and stream its changed rows into Ekko.

from ekko.torch import EmbeddingPublisher, PublisherConfig, MemorySink
"""

from ekko.store.spec import Sink
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig, PublisherStatistics
from ekko.train.sink import MemorySink

__all__ = ["EmbeddingPublisher", "MemorySink", "PublisherConfig", "PublisherStatistics", "Sink"]
