"""Public publisher API: wrap any torch model and stream its changed rows into Ekko.

from ekko.torch import EmbeddingPublisher, PublisherConfig, MemorySink
from ekko.torch import DynamicEmbedding, DynamicEmbeddingConfig  # raw ids, bounded rows
from ekko.torch import MemoryBudget  # bytes shared by several dynamic tables
"""

from ekko.store.spec import Sink
from ekko.train.admission import AdmissionConfig
from ekko.train.dynamic_embedding import (
    DynamicEmbedding,
    DynamicEmbeddingConfig,
    DynamicEmbeddingStatistics,
)
from ekko.train.eviction import EvictionConfig
from ekko.train.memory_budget import MemoryBudget, MemoryBudgetStatistics
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig, PublisherStatistics
from ekko.train.sink import DeletingSink, MemorySink

__all__ = [
    "AdmissionConfig",
    "DeletingSink",
    "DynamicEmbedding",
    "DynamicEmbeddingConfig",
    "DynamicEmbeddingStatistics",
    "EmbeddingPublisher",
    "EvictionConfig",
    "MemoryBudget",
    "MemoryBudgetStatistics",
    "MemorySink",
    "PublisherConfig",
    "PublisherStatistics",
    "Sink",
]
