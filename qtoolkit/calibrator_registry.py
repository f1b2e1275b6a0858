"""Import path kept for existing code: the module is :mod:`qtoolkit.calibration.registry`."""

from qtoolkit.calibration.registry import *  # noqa: F403
from qtoolkit.calibration.registry import __all__ as __all__
