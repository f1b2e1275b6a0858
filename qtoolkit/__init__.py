"""qtoolkit: eager-mode post-training quantization and quantization-aware training
for PyTorch on plain ``torch.int8`` tensors.

Example::

    >>> import torch, torchvision
    >>> import qtoolkit as qt
    >>> model = torchvision.models.resnet18(num_classes=10).eval()
    >>> qm = qt.prepare(model, "w8a8")
    >>> qm = qt.calibrate(qm, [torch.randn(8, 3, 32, 32) for _ in range(2)], progress=False)
    >>> int8 = qt.convert(qm)
"""

from qtoolkit._version import __version__ as __version__
from qtoolkit.calibrate import calibrate
from qtoolkit.calibration import register_calibrator
from qtoolkit.config import PRESETS, QConfig, QuantizerConfig, get_qconfig
from qtoolkit.convert import convert, set_execution, uncalibrated_sites
from qtoolkit.executor import program_status
from qtoolkit.export import DeployedModel, deploy, export_onnx, load_deployed, verify_onnx
from qtoolkit.fake_quant import FakeQuantize
from qtoolkit.fuse import fuse_model
from qtoolkit.prepare import float_ops, prepare
from qtoolkit.ptq import (
    MixedPrecisionResult,
    SensitivityReport,
    mixed_precision,
    reconstruct,
    sensitivity,
    weight_bytes,
)
from qtoolkit.qat import QATConfig, QATTrainer, evaluate_top1, fit_qat, sync_quantizers
from qtoolkit.spec import QuantSpec
from qtoolkit.summary import summary, summary_rows
from qtoolkit.toggles import (
    disable_fake_quant,
    disable_observers,
    enable_fake_quant,
    enable_observers,
    fake_quant_disabled,
    freeze_bn,
    observers_disabled,
    quantizers,
    unfreeze_bn,
)

__all__ = [
    "PRESETS",
    "FakeQuantize",
    "MixedPrecisionResult",
    "QATConfig",
    "QATTrainer",
    "QConfig",
    "QuantSpec",
    "QuantizerConfig",
    "SensitivityReport",
    "DeployedModel",
    "calibrate",
    "convert",
    "deploy",
    "disable_fake_quant",
    "disable_observers",
    "enable_fake_quant",
    "enable_observers",
    "evaluate_top1",
    "export_onnx",
    "fake_quant_disabled",
    "fit_qat",
    "float_ops",
    "freeze_bn",
    "fuse_model",
    "get_qconfig",
    "load_deployed",
    "mixed_precision",
    "observers_disabled",
    "prepare",
    "program_status",
    "quantizers",
    "reconstruct",
    "register_calibrator",
    "sensitivity",
    "set_execution",
    "summary",
    "summary_rows",
    "sync_quantizers",
    "uncalibrated_sites",
    "unfreeze_bn",
    "verify_onnx",
    "weight_bytes",
]
