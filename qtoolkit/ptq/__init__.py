"""PTQ beyond range calibration.

* :func:`reconstruct` — cross-layer equalization, bias correction, AdaRound, BRECQ and QDrop on a calibrated
  prepared model (:mod:`.api`, :mod:`.engine`, :mod:`.adaround`, :mod:`.bias_correction`, :mod:`.cle`);
* :func:`sensitivity` — per-site metric with one site quantized / one site float (:mod:`.sensitivity`);
* :func:`mixed_precision` — per-layer bit widths for a size or metric budget (:mod:`.mixed_precision`).
"""

from qtoolkit.ptq.api import METHODS, reconstruct
from qtoolkit.ptq.mixed_precision import MixedPrecisionResult, mixed_precision, weight_bytes
from qtoolkit.ptq.sensitivity import SensitivityReport, SiteSensitivity, output_sqnr, sensitivity

__all__ = [
    "METHODS",
    "MixedPrecisionResult",
    "SensitivityReport",
    "SiteSensitivity",
    "mixed_precision",
    "output_sqnr",
    "reconstruct",
    "sensitivity",
    "weight_bytes",
]
