"""Import path kept for existing code: the module is :mod:`qtoolkit.calibration.base`."""

from qtoolkit.calibration.base import *  # noqa: F403
from qtoolkit.calibration.base import __all__ as __all__
from qtoolkit.calibration.base import _clean_range  # noqa: F401 - re-exported
