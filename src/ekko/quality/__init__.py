"""Model-quality and latency metrics that serving, training and the guard all read: windowed
online AUC / log loss / calibration, offline AUC and log loss, and update-latency histograms.
Pure numpy, so it sits low in the layers and imports nothing else of Ekko."""

from ekko.quality.errors import QualityConfigError
from ekko.quality.latency import LatencyHistogram
from ekko.quality.offline import auc, log_loss
from ekko.quality.windowed import QualitySnapshot, WindowedQuality, metric_name

__all__ = [
    "LatencyHistogram",
    "QualityConfigError",
    "QualitySnapshot",
    "WindowedQuality",
    "auc",
    "log_loss",
    "metric_name",
]
