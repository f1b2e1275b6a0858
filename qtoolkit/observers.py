"""Import path kept for existing code: the observers are in :mod:`qtoolkit.calibration`."""

from qtoolkit.calibration import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    PerChannelMSEObserver,
    PerChannelPercentileObserver,
    make_observer,
)

__all__ = [
    "ObserverBase",
    "MinMaxObserver",
    "PerChannelMinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "PerChannelPercentileObserver",
    "PerChannelMSEObserver",
    "make_observer",
]
