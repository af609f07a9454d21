"""Training side of Ekko: DLRM, event streams, the online trainer and the row publisher."""

from ekko.train.dlrm import DLRM, DLRMConfig, DLRMServingModel
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig, PublisherStatistics
from ekko.train.sink import MemorySink
from ekko.train.streams import Events, MovieLensStream, StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, StepResult, TrainerConfig

__all__ = [
    "DLRM",
    "DLRMConfig",
    "DLRMServingModel",
    "EmbeddingPublisher",
    "Events",
    "MemorySink",
    "MovieLensStream",
    "OnlineTrainer",
    "PublisherConfig",
    "PublisherStatistics",
    "StepResult",
    "StreamConfig",
    "SyntheticStream",
    "TrainerConfig",
]
