"""Import path kept for existing code: the module is :mod:`qtoolkit.calibration.per_channel`."""

from qtoolkit.calibration.per_channel import *  # noqa: F403
from qtoolkit.calibration.per_channel import __all__ as __all__
