"""Converted weight layers (Conv1d/2d/3d, ConvTranspose, Linear: every kind in :mod:`qtoolkit.layer_kinds`) holding integer weights (the *converted* form).

Weights live in a plain ``torch.int8`` buffer (``weight_q``), packed two per
byte in ``uint8`` for ≤ 4 bits, or ``torch.int16`` for 9–16-bit grids (those run
the reference / integer paths; the int8 kernels take ≤ 8 bits), with float per-channel scales; activations'
qparams are float/int32 buffers; no quantized dtypes, no deprecated quantization APIs.

Execution paths (``module.execution``):

* ``"reference"``: quantize the input to its grid, dequantize the integer weight,
  float conv — numerically the prepared (fake-quant) model.
* ``"integer"`` (static mode): integer-only arithmetic after Jacob et al. 2018:
  ``acc = Σ (q_x − z_x)(q_w − z_w)`` accumulated exactly, bias quantized to int32 at
  scale ``s_x·s_w``, requantized with the fixed-point multiplier
  ``M = s_x·s_w/s_y = M0·2^-31·2^-n`` (rounding right shift), ``+ z_y``, clamped —
  the fused ReLU/ReLU6 is the clamp. The codes are returned dequantized.
* ``"fast"``: oneDNN int8 kernels on uint8 codes, prepacked weights, activations kept as
  uint8 codes between layers (see :mod:`qtoolkit.kernels.dispatch`); falls back to
  ``"reference"`` with a one-time warning where the kernels cannot be used.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from qtoolkit import prepare, calibrate, convert
    >>> m = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    >>> _ = calibrate(m, [torch.randn(2, 3, 8, 8)], progress=False)
    >>> q = convert(m)
    >>> q[0].weight_q.dtype
    torch.int8
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qtoolkit.inference import inference_only
from qtoolkit.kernels import dispatch
from qtoolkit.kernels.params import LayerParams
from qtoolkit.kernels.qtensor import QuantizedActivation
from qtoolkit.layer_kinds import LayerKind, get_layer_kind
from qtoolkit.nn.float_attrs import FLOAT_ATTRS, keep_float_attributes
from qtoolkit.nn.fused import apply_activation
from qtoolkit.nn.quant_layer import QuantLayer
from qtoolkit.numerics import (
    HALF_DTYPES,
    compute_qparams,
    dequantize,
    fake_quantize,
    integer_dtype_for,
    quantize,
    quantize_multiplier_tensor,
    requantize,
)
from qtoolkit.packing import pack_int4, unpack_int4
from qtoolkit.spec import QuantSpec

__all__ = ["Int8Layer", "EXECUTIONS", "EXECUTION_REGISTRY", "inference_only"]

#: the executions every converted module understands (``qtoolkit.set_execution``): name -> what it computes.
#: A module without a kernel for ``"fast"`` runs its ``"reference"`` execution there (layers warn once, naming why).
EXECUTION_REGISTRY: dict[str, str] = {
    "reference": "simulated int8: inputs fake-quantized, dequantized integer weights, float op (= the prepared model)",
    "integer": "integer-only arithmetic: exact int32 accumulation, fixed-point requantization (static mode)",
    "fast": "oneDNN int8 kernels on uint8 codes where they apply, else the reference execution",
}
EXECUTIONS = tuple(EXECUTION_REGISTRY)


def _code_dtype(spec: QuantSpec) -> torch.dtype:
    """Storage dtype of weight codes: int8 / uint8 up to 8 bits, int16 (int32 for 16-bit unsigned) above."""
    if spec.bits <= 8:
        return torch.int8 if spec.signed else torch.uint8
    return integer_dtype_for(spec.qmin, spec.qmax)


class Int8Layer(nn.Module):
    """Integer-weight Conv1d/Conv2d/Linear. Build with :meth:`from_quant`."""

    def __init__(self, q: QuantLayer) -> None:
        super().__init__()
        self.kind = q.kind
        self.mode = q.qconfig.mode
        self.act = q.act
        self.name = "int8_layer"
        self.execution = "reference"
        # set by convert() where the output leaves the int8 graph (model output, avgpool): every execution then
        # returns the float value of the int32 accumulator instead of requantized 8-bit codes
        self.float_output = False
        for attr in ("stride", "padding", "dilation", "groups", "in_channels", "kernel_size", "in_features", "out_features",
                     "output_padding"):
            if hasattr(q, attr):
                setattr(self, attr, getattr(q, attr))
        self.out_channels = q.out_channels
        wspec = q.weight_quantizer.spec
        self.weight_bits = wspec.bits
        self.weight_qmin, self.weight_qmax = wspec.qmin, wspec.qmax
        self.weight_shape = tuple(q.weight.shape)
        self.packed = wspec.bits <= 4 and wspec.signed
        n = self.out_channels
        if self.packed:
            k = 1
            for d in self.weight_shape[1:]:
                k *= d
            self.register_buffer("weight_q", torch.zeros(n, (k + 1) // 2, dtype=torch.uint8))
        else:
            # the smallest plain integer dtype of the grid: int8 / uint8 up to 8 bits, int16 (or int32) for 9-16 bits
            self.register_buffer("weight_q", torch.zeros(self.weight_shape, dtype=_code_dtype(wspec)))
        self.register_buffer("weight_scale", torch.ones(n))
        self.register_buffer("weight_zero_point", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(n) if q.bias is not None else None)
        aspec = q.qconfig.activation.spec if q.qconfig.activation is not None else None
        self.act_qmin = aspec.qmin if aspec else 0
        self.act_qmax = aspec.qmax if aspec else 0
        self.act_symmetric = aspec.symmetric if aspec else False
        if self.mode == "static":
            for p in ("input", "output"):
                self.register_buffer(f"{p}_scale", torch.ones(()))
                self.register_buffer(f"{p}_zero_point", torch.zeros((), dtype=torch.int32))
            self.register_buffer("multiplier_m0", torch.zeros(n, dtype=torch.int64))
            self.register_buffer("multiplier_shift", torch.zeros(n, dtype=torch.int64))
            self.register_buffer("bias_int32", torch.zeros(n, dtype=torch.int32))
        keep_float_attributes(self, {k: getattr(q, k) for k in getattr(q, FLOAT_ATTRS, ())})

    # ---------------------------------------------------------------- build
    @classmethod
    @torch.no_grad()
    def from_quant(cls, q: QuantLayer, require_calibrated: bool = True) -> Int8Layer:
        """Convert a prepared :class:`QuantLayer` (its quantizers already calibrated)."""
        m = cls(q)
        w, b = q.folded_weight_bias()
        wq = q.weight_quantizer
        if bool(wq.observer_enabled) or not wq.is_calibrated:
            q.calibrate_weight()
        scale, zp = wq.scale.detach().float(), wq.zero_point.detach()
        codes = quantize(w.detach().float(), scale, zp, m.weight_qmin, m.weight_qmax, axis=0, dtype=_code_dtype(wq.spec))
        m.weight_q = pack_int4(codes) if m.packed else codes
        m.weight_scale = scale.clone()
        m.weight_zero_point = zp.to(torch.int32).clone()
        if b is not None:
            m.bias = b.detach().float().clone()
        if m.mode == "static":
            iq, oq = q.input_quantizer, q.output_quantizer
            assert iq is not None and oq is not None
            if iq.is_calibrated and oq.is_calibrated:
                m.input_scale = iq.scale.detach().float().reshape(()).clone()
                m.input_zero_point = iq.zero_point.detach().reshape(()).to(torch.int32).clone()
                m.output_scale = oq.scale.detach().float().reshape(()).clone()
                m.output_zero_point = oq.zero_point.detach().reshape(()).to(torch.int32).clone()
                m._update_integer_params()
            elif require_calibrated:
                raise RuntimeError(f"{q.weight_quantizer.name}: activation quantizers are not calibrated")
        return m

    @torch.no_grad()
    def _update_integer_params(self) -> None:
        """Fixed-point multipliers and the int32 bias, from the float qparams."""
        acc_scale = self.input_scale.double() * self.weight_scale.double()
        m0, shift = quantize_multiplier_tensor(acc_scale / self.output_scale.double())
        self.multiplier_m0, self.multiplier_shift = m0, shift
        if self.bias is not None:
            self.bias_int32 = torch.clamp(torch.round(self.bias.double() / acc_scale), -(2**31), 2**31 - 1).to(torch.int32)

    # ---------------------------------------------------------------- pieces
    def int_weight(self) -> Tensor:
        """The integer weight codes, unpacked, as int8 (or uint8)."""
        if self.packed:
            return unpack_int4(self.weight_q, self.weight_shape)
        return self.weight_q

    def effective_bias(self) -> Tensor | None:
        """The float bias every execution path adds: in static mode the int32 bias
        ``bias_int32 · s_x · s_w`` (what the prepared model simulates), else ``bias``."""
        if self.bias is None or self.mode != "static" or getattr(self, "bias_int32", None) is None:
            return self.bias
        acc_scale = self.input_scale.double() * self.weight_scale.double()
        return (self.bias_int32.double() * acc_scale).to(self.bias.dtype)

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.int_weight(), self.weight_scale, self.weight_zero_point, axis=0)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight in the float module's own layout (read-only, no gradient), for model code that
        reads ``layer.weight`` (its dtype, device, shape: timm's EdgeNeXt casts its positional encoding to
        ``token_projection.weight.dtype``). ``bias`` is the float bias buffer (BatchNorm folded).

        Example::

            >>> import torch
            >>> from torch import nn
            >>> from qtoolkit import prepare, calibrate, convert
            >>> m = calibrate(prepare(nn.Sequential(nn.Linear(4, 3))), [torch.randn(8, 4)], progress=False)
            >>> q = convert(m)
            >>> q[0].weight.shape, q[0].weight.dtype, q[0].in_features, q[0].out_features
            (torch.Size([3, 4]), torch.float32, 4, 3)
        """
        w = self.kind_info.from_canonical(self.dequantized_weight(), getattr(self, "groups", 1))
        return w.to(self.weight_scale.dtype).detach()

    @property
    def kind_info(self) -> LayerKind:
        """The :class:`~qtoolkit.layer_kinds.LayerKind` of this layer."""
        return get_layer_kind(self.kind)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The layer's float op with a canonical (out-channels-first) weight."""
        return self.kind_info.op(x, w, b, self)

    def _quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.mode == "static":
            s, z = self.input_scale, self.input_zero_point
        else:
            lo, hi = x.detach().aminmax()
            s, z = compute_qparams(lo, hi, self.act_qmin, self.act_qmax, self.act_symmetric)
        return quantize(x, s, z, self.act_qmin, self.act_qmax), s, z

    # ---------------------------------------------------------------- forward
    def forward_reference(self, x: Tensor) -> Tensor:
        """Simulated int8: fake-quantized input, dequantized weight, float op.

        Bit-identical to the prepared (fake-quant) model on the same batch.  Like any float conv / matmul,
        its summation order — so the last bits of the result, and at a rounding tie the next layer's code —
        depends on the batch size and memory layout (torch picks the algorithm per shape): the same image in
        a batch of 1 and of 64, or NCHW vs channels_last, can differ by one code at a tie, which through a deep
        network moves logits by up to a few output steps.  The ``"integer"`` execution accumulates exactly and
        is batch- and layout-invariant bit for bit; use it where that matters (tests, golden outputs).
        """
        if self.mode == "static":
            x = fake_quantize(x, self.input_scale, self.input_zero_point, self.act_qmin, self.act_qmax)
        elif self.mode == "dynamic":
            lo, hi = x.detach().aminmax()
            s, z = compute_qparams(lo, hi, self.act_qmin, self.act_qmax, self.act_symmetric)
            x = fake_quantize(x, s, z, self.act_qmin, self.act_qmax)
        b = self.effective_bias()
        y = self._op(x, self.dequantized_weight().to(x.dtype), None if b is None else b.to(x.dtype))
        return apply_activation(y, self.act)

    def _int_accumulate(self, xq: Tensor, wq: Tensor, xmax: int | None = None) -> Tensor:
        """Exact ``Σ xq·wq`` (int64) of the conv/linear on integer codes.

        Computed with float32 kernels where that is provably exact: the weight is split
        as ``wq = 16·w_hi + w_lo`` (``w_lo`` in [0, 15]) and each partial op's sums are
        integers below 2^24 in magnitude (``K·max|xq|·max|w_part| < 2^24``, ``K`` the
        reduction length), so float32 represents every partial sum exactly in any
        summation order; ``acc = 16·acc_hi + acc_lo``. Otherwise float64 (exact below
        2^53), which is much slower on CPU. ``xmax`` bounds ``|xq|`` when the caller knows it (the code range
        around the zero point); otherwise it is measured.
        """
        k = wq[0].numel()  # reduction length: in_features, or in_channels/groups · kernel
        if xmax is None:
            xmax = int(xq.abs().max()) if xq.numel() else 0
        w_lo = torch.remainder(wq, 16)
        w_hi = torch.div(wq - w_lo, 16, rounding_mode="floor")
        wmax = max(15, int(w_hi.abs().max()) if w_hi.numel() else 0)
        if k * xmax * wmax < 2**24:
            xf = xq.to(torch.float32)
            acc_hi = self._op(xf, w_hi.to(torch.float32), None).to(torch.int64)
            acc_lo = self._op(xf, w_lo.to(torch.float32), None).to(torch.int64)
            return acc_hi * 16 + acc_lo
        return torch.round(self._op(xq.double(), wq.double(), None)).to(torch.int64)

    def forward_integer(self, x: Tensor) -> Tensor:
        """Integer-only execution (static mode): int32 accumulate, fixed-point requantize."""
        if self.mode != "static":
            raise RuntimeError(f"{self.name}: integer-only execution needs static mode (this layer is {self.mode})")
        qx, _, zx = self._quantize_input(x)
        wq = self.int_weight().to(torch.int64) - self.weight_zero_point.to(torch.int64).reshape(
            [-1] + [1] * (len(self.weight_shape) - 1)
        )
        z = int(zx)
        acc = self._int_accumulate(qx.to(torch.int64) - z, wq, max(self.act_qmax - z, z - self.act_qmin))
        cshape = self.kind_info.channel_shape(acc.dim())
        if self.bias is not None:
            acc = acc + self.bias_int32.to(torch.int64).reshape(cshape)
        if self.float_output:
            # the output leaves the quantized graph (model output, avgpool): dequantize the
            # int32 accumulator instead of requantizing to 8 bits, as an engine with an fp32
            # network output does; an 8-bit requantization of the logits would flip top-1
            # on near-ties that the fake-quant model does not round.
            acc_scale = (self.input_scale.double() * self.weight_scale.double()).reshape(cshape)
            return apply_activation(acc.double() * acc_scale, self.act).to(x.dtype)
        zo = int(self.output_zero_point)
        lo, hi = self.act_qmin, self.act_qmax
        if self.act in ("relu", "relu6"):
            lo = max(lo, zo)
        if self.act == "relu6":
            hi = min(hi, zo + int(torch.round(6.0 / self.output_scale)))
        yq = requantize(acc, self.multiplier_m0.reshape(cshape), self.multiplier_shift.reshape(cshape), zo, lo, hi)
        return dequantize(yq, self.output_scale, self.output_zero_point).to(x.dtype)

    def check_input_shape(self, x: Tensor) -> None:
        """Raise a ValueError naming this layer if ``x`` cannot be its input (rank, channels / features)."""
        if type(x) is QuantizedActivation:  # its plain codes: no __torch_function__ round trip per query
            x = x.codes if x.codes is not None else x
        elif not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: expected a tensor, got a {type(x).__name__}")
        if self.kind_info.is_linear:
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                raise ValueError(
                    f"{self.name}: Linear expects inputs with {self.in_features} features in the last dimension, "
                    f"got shape {tuple(x.shape)}"
                )
            return
        dims = self.kind_info.input_dims
        if x.dim() not in (dims - 1, dims) or x.shape[-(dims - 1)] != self.in_channels:
            raise ValueError(
                f"{self.name}: {self.kind} expects a [N, {self.in_channels}, ...] input ({dims}-D, or {dims - 1}-D "
                f"unbatched) with {self.in_channels} channels, got shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Run the selected execution path.

        ``x`` is a float tensor or a :class:`~qtoolkit.kernels.qtensor.QuantizedActivation` (the int8
        carrier the fast path passes between converted modules; other paths take its float value).
        A wrong rank / channel count raises a ValueError naming the layer.
        """
        self.check_input_shape(x)
        if self.execution == "fast":
            return dispatch.fast_forward(self, x)
        if isinstance(x, QuantizedActivation):
            x = x.dequantize()
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: expected a floating-point input, got {x.dtype}")
        dt = x.dtype
        if dt in HALF_DTYPES:  # computed in float32, returned in the input's dtype (as the prepared model)
            x = x.to(torch.float32)
        if self.execution == "integer":
            y = self.forward_integer(x)
        else:
            y = self.forward_reference(x)
        return inference_only(y.to(dt) if dt in HALF_DTYPES else y, self.name)

    def kernel_params(self) -> LayerParams:
        """This layer as the int8 kernels see it (a frozen snapshot; see :mod:`qtoolkit.kernels.params`)."""
        static = self.mode == "static"
        geometry = {} if self.kind_info.is_linear else {
            "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
            "padding_mode": getattr(self, "padding_mode", "zeros"),
        }  # fmt: skip
        return LayerParams(
            self.name, self.kind, self.mode, self.act, self.int_weight(), self.weight_scale, self.weight_zero_point,
            self.weight_qmin, self.weight_qmax, None if self.bias is None else self.effective_bias(), geometry,
            self.act_qmin, self.act_qmax, bool(self.act_symmetric),
            float(self.input_scale) if static else 1.0, int(self.input_zero_point) if static else 0,
            float(self.output_scale) if static else 1.0, int(self.output_zero_point) if static else 0,
            bool(self.float_output),
        )  # fmt: skip

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self.__dict__.pop("_qt_fast", None)  # prepacked kernel state follows the buffers
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        self.__dict__.pop("_qt_fast", None)  # prepacked kernel state is rebuilt from the new buffers
        key = prefix + "bias"
        if key in state_dict and self.bias is None:
            self.bias = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, weight=int{self.weight_bits}{' packed' if self.packed else ''} {self.weight_shape}, "
            f"mode={self.mode}, act={self.act}, execution={self.execution}"
        )
