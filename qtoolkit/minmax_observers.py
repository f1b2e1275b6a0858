"""Import path kept for existing code: the module is :mod:`qtoolkit.calibration.minmax`."""

from qtoolkit.calibration.minmax import *  # noqa: F403
from qtoolkit.calibration.minmax import __all__ as __all__
