"""Import path kept for existing code: the range calibrators are in :mod:`qtoolkit.calibration`."""

from qtoolkit.calibration import (
    KL_EPS,  # noqa: F401 - re-exported (module constant)
    abs_histogram,
    entropy_range,
    expected_quant_mse,
    mse_range,
    mse_range_tensor,
    percentile_range,
    percentile_range_tensor,
)
from qtoolkit.calibration.histogram_ranges import _kl_divergences  # noqa: F401 - re-exported (private, tested directly)

__all__ = [
    "abs_histogram",
    "percentile_range",
    "entropy_range",
    "mse_range",
    "percentile_range_tensor",
    "mse_range_tensor",
    "expected_quant_mse",
]
