"""What :class:`~qtoolkit.qat.QATTrainer` checks of the model it is given before training."""

from __future__ import annotations

from torch import nn

from qtoolkit.toggles import quantizers

_QAT_ATTR = "_qtoolkit_qat"  # set by qtoolkit.prepare


def _check_qat_model(module: nn.Module) -> None:
    flags = [getattr(m, _QAT_ATTR) for m in module.modules() if hasattr(m, _QAT_ATTR)]
    if any(f is True for f in flags):
        return
    if flags:
        # PTQ form (BN folded): trains as it is once every range exists (calibrated / reconstructed)
        missing = [
            name for name, fq in quantizers(module)
            if fq.role in ("weight", "activation") and bool(fq.fake_quant_enabled) and not fq.is_calibrated
        ]
        if missing:
            raise ValueError(
                "QATTrainer: the model was prepared for post-training quantization (BatchNorm folded) but is not "
                f"calibrated ({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} have no range); run "
                "qtoolkit.calibrate(model, data) (and optionally qtoolkit.reconstruct) and "
                "qtoolkit.qat.start_from_prepared(model) first, or prepare with qtoolkit.prepare(model, qconfig, qat=True)"
            )
        return
    if next(quantizers(module), None) is None:
        raise ValueError(
            "QATTrainer: the model has no quantizers; prepare it first with qtoolkit.prepare(model, qconfig, qat=True)"
        )
    raise ValueError(
        "QATTrainer: the model was not prepared with qtoolkit.prepare(model, qconfig, qat=True) "
        "(no QAT marker found on it)"
    )
