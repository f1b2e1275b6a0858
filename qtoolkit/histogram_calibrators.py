"""Import path kept for existing code: the module is :mod:`qtoolkit.calibration.histogram_ranges`."""

from qtoolkit.calibration.histogram_ranges import *  # noqa: F403
from qtoolkit.calibration.histogram_ranges import _GROUP_BOUNDS, KL_EPS, _check_percentile, _group_bounds, _kl_divergences  # noqa: F401 - re-exported
from qtoolkit.calibration.histogram_ranges import __all__ as __all__
