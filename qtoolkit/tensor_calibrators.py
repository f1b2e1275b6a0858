"""Import path kept for existing code: the module is :mod:`qtoolkit.calibration.tensor_ranges`."""

from qtoolkit.calibration.tensor_ranges import *  # noqa: F403
from qtoolkit.calibration.tensor_ranges import __all__ as __all__
