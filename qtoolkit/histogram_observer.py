"""Import path kept for existing code: the module is :mod:`qtoolkit.calibration.histogram`."""

from qtoolkit.calibration.histogram import *  # noqa: F403
from qtoolkit.calibration.histogram import __all__ as __all__
