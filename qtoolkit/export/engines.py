"""Inference engines that :func:`qtoolkit.export.deploy` compiles an exported Q/DQ graph with.

One class per engine, each with the same small surface:

* ``defaults(threads)``: the engine settings :func:`~qtoolkit.export.deploy` uses unless overridden —
  chosen to be **faithful** (they compute what the fake-quant model does, up to rounding ties) and fast;
* ``compile(model, settings)``: an :class:`EngineRunner` (numpy arrays in, numpy arrays out) for an ONNX
  ``ModelProto`` (or the engine's own saved form);
* ``save(runner, directory)`` / ``load(directory, settings)``: the engine's own files.

OpenVINO (``pip install 'qtoolkit[openvino]'``): ``INFERENCE_PRECISION_HINT="f32"`` — on CPUs with native
bf16 (AVX512_BF16, AMX) OpenVINO's default runs every non-quantized op (pooling, float heads, the
dequantized glue) in bf16, ~8× the error of the int8 model itself; ``INFERENCE_NUM_THREADS`` explicit
(default: torch's thread count); ``PERFORMANCE_HINT="LATENCY"`` (one stream: one request at a time uses
every thread).  ONNX Runtime (``pip install 'qtoolkit[export]'``): ``ORT_ENABLE_ALL`` (QDQ fusion into
``QLinearConv`` / ``QGemm`` / ``QLinearAdd``), ``intra_op_num_threads`` explicit, one inter-op thread,
sequential execution.

Example::

    >>> sorted(ENGINES)
    ['onnxruntime', 'openvino']
    >>> OpenVINOEngine.defaults(2)["INFERENCE_PRECISION_HINT"]
    'f32'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ENGINES", "EngineRunner", "OnnxRuntimeEngine", "OpenVINOEngine", "get_engine"]

OPENVINO_HINT = "pip install 'qtoolkit[openvino]'  (openvino>=2024.0)"
ORT_HINT = "pip install 'qtoolkit[export]'  (onnx>=1.15, onnxruntime>=1.17)"


class EngineRunner:
    """A compiled model: ``runner(arrays) -> list of arrays`` (numpy, in the graph's input/output order).

    Attributes:
        input_names / output_names: the graph's, in order.
        native: the engine's own object (``openvino.CompiledModel`` / ``onnxruntime.InferenceSession``).
        source: what was compiled (``openvino.Model`` or the ONNX bytes), for :meth:`save`.
        notes: what the engine class changed in the graph before compiling (same values; e.g. folded constants).
    """

    def __init__(self, run: Any, input_names: list[str], output_names: list[str], native: Any, source: Any,
                 notes: list[str] | None = None) -> None:  # fmt: skip
        self._run = run
        self.input_names, self.output_names = input_names, output_names
        self.native, self.source = native, source
        self.notes = list(notes or [])

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) != len(self.input_names):
            raise ValueError(f"the deployed model has inputs {self.input_names} but got {len(arrays)} array(s)")
        return self._run(arrays)


# --------------------------------------------------------------------------- OpenVINO
def _port_names(compiled_ports: Sequence[Any], model_ports: Sequence[Any], graph_names: Sequence[str] | None) -> list[str]:
    """One name per compiled input/output port, the one the graph gave it.

    OpenVINO's compiled ports keep the model's port order but can carry several tensor names: when it moves a
    ``Transpose`` / ``Reshape`` across a quantization node, the output port also takes the moved op's name, and
    ``get_any_name()`` may then return that one (seen with OpenVINO 2026.4 on ConvNeXt, DenseNet, ViT, Swin V2).
    So the name is the ONNX graph's own name for that position when it is among the port's names, else a name the
    port had before compilation, else any."""
    names = []
    for i, port in enumerate(compiled_ports):
        have = port.get_names()
        before = sorted(model_ports[i].get_names()) if i < len(model_ports) else []
        want = [graph_names[i]] if graph_names is not None and i < len(graph_names) else []
        pick = next((n for n in [*want, *before] if n in have), None)
        names.append(pick if pick is not None else port.get_any_name())
    return names


class OpenVINOEngine:
    """OpenVINO CPU plugin (the ONNX file is read by OpenVINO's ONNX frontend, then compiled)."""

    name = "openvino"
    file_names = ("model.xml", "model.bin")

    @staticmethod
    def import_module() -> Any:
        try:
            import openvino
        except ImportError as exc:
            raise ImportError(f"qtoolkit.deploy(engine='openvino') needs the 'openvino' package: {OPENVINO_HINT}") from exc
        return openvino

    @staticmethod
    def defaults(threads: int) -> dict[str, Any]:
        return {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}

    @classmethod
    def read(cls, model: Any) -> Any:
        """An ``openvino.Model`` from ONNX bytes / a ``ModelProto`` (or one passed through)."""
        ov = cls.import_module()
        if isinstance(model, ov.Model):
            return model
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return ov.Core().read_model(data, b"")

    @classmethod
    def compile(cls, model: Any, settings: dict[str, Any]) -> EngineRunner:
        ov = cls.import_module()
        notes = []
        if not isinstance(model, (bytes, ov.Model)):  # an ONNX ModelProto: constants' Q/DQ folded (see fold_constant_qdq)
            from qtoolkit.export.graph_passes import fold_constant_qdq, hoist_quantize_above_movement

            folded_model = type(model)()
            folded_model.CopyFrom(model)
            folded = fold_constant_qdq(folded_model)
            hoisted = hoist_quantize_above_movement(folded_model)
            if folded or hoisted:
                model = folded_model
            if folded:
                notes.append(f"{len(folded)} quantize-dequantize pair(s) of constants folded into float constants of the same "
                             f"values (OpenVINO's AddTransformation cannot compile them; first: {folded[0]})")
            if hoisted:
                notes.append(f"{hoisted} per-tensor QuantizeLinear(s) moved above Reshape/Transpose ops (the same codes; OpenVINO "
                             "computes conv → reshape → transpose → quantize wrong)")
        ov_model = cls.read(model)
        try:
            compiled = ov.Core().compile_model(ov_model, "CPU", dict(settings))
        except Exception as exc:  # noqa: BLE001 - name the engine and the settings
            raise RuntimeError(f"OpenVINO could not compile the model with settings {settings}: {exc}") from exc
        request = compiled.create_infer_request()
        n_out = len(compiled.outputs)

        def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
            request.infer(list(arrays), share_inputs=True)
            return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(n_out)]

        onnx_io = (None, None) if isinstance(model, (bytes, ov.Model)) else ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
        ins = _port_names(compiled.inputs, ov_model.inputs, onnx_io[0])
        outs = _port_names(compiled.outputs, ov_model.outputs, onnx_io[1])
        return EngineRunner(run, ins, outs, compiled, ov_model, notes)

    @classmethod
    def save(cls, runner: EngineRunner, directory: Path) -> list[Path]:
        ov = cls.import_module()
        xml = directory / cls.file_names[0]
        # compress_to_fp16=False: OpenVINO's default would store float constants (biases kept float, scales) as fp16
        ov.save_model(runner.source, os.fspath(xml), compress_to_fp16=False)
        return [xml, directory / cls.file_names[1]]

    @classmethod
    def load(cls, directory: Path, settings: dict[str, Any]) -> EngineRunner:
        ov = cls.import_module()
        return cls.compile(ov.Core().read_model(os.fspath(directory / cls.file_names[0])), settings)


# --------------------------------------------------------------------------- ONNX Runtime
_ORT_LEVELS = ("none", "basic", "extended", "all")


class OnnxRuntimeEngine:
    """ONNX Runtime, CPU execution provider.

    Settings: ``intra_op_num_threads``, ``inter_op_num_threads``, ``graph_optimization_level`` (``"all"``,
    ``"extended"``, ``"basic"``, ``"none"``), ``execution_mode`` (``"sequential"`` / ``"parallel"``), and any
    session config entry by its key (``"session.intra_op.allow_spinning"``: ``"1"`` / ``"0"``, ...).
    """

    name = "onnxruntime"
    file_names = ("model.onnx",)

    @staticmethod
    def import_module() -> Any:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError(f"qtoolkit.deploy(engine='onnxruntime') needs the 'onnxruntime' package: {ORT_HINT}") from exc
        return onnxruntime

    @staticmethod
    def defaults(threads: int) -> dict[str, Any]:
        return {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1, "graph_optimization_level": "all",
                "execution_mode": "sequential"}  # fmt: skip

    @classmethod
    def session_options(cls, settings: dict[str, Any]) -> Any:
        ort = cls.import_module()
        so = ort.SessionOptions()
        for key, value in settings.items():
            if key == "graph_optimization_level":
                if value not in _ORT_LEVELS:
                    raise ValueError(f"deploy(engine='onnxruntime'): graph_optimization_level must be one of {_ORT_LEVELS}, got {value!r}")
                so.graph_optimization_level = {
                    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                }[value]
            elif key == "execution_mode":
                if value not in ("sequential", "parallel"):
                    raise ValueError(f"deploy(engine='onnxruntime'): execution_mode must be 'sequential' or 'parallel', got {value!r}")
                so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if value == "sequential" else ort.ExecutionMode.ORT_PARALLEL
            elif key in ("intra_op_num_threads", "inter_op_num_threads"):
                setattr(so, key, int(value))
            elif "." in key:
                so.add_session_config_entry(key, str(value))
            else:
                raise ValueError(
                    f"deploy(engine='onnxruntime'): unknown setting {key!r}; use intra_op_num_threads, inter_op_num_threads, "
                    "graph_optimization_level, execution_mode or a session config key such as 'session.intra_op.allow_spinning'"
                )
        return so

    @classmethod
    def compile(cls, model: Any, settings: dict[str, Any]) -> EngineRunner:
        ort = cls.import_module()
        data = model if isinstance(model, bytes) else model.SerializeToString()
        sess = ort.InferenceSession(data, cls.session_options(settings), providers=["CPUExecutionProvider"])
        ins = [i.name for i in sess.get_inputs()]
        outs = [o.name for o in sess.get_outputs()]

        def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
            return sess.run(outs, dict(zip(ins, arrays)))

        return EngineRunner(run, ins, outs, sess, data)

    @classmethod
    def save(cls, runner: EngineRunner, directory: Path) -> list[Path]:
        path = directory / cls.file_names[0]
        path.write_bytes(runner.source)
        return [path]

    @classmethod
    def load(cls, directory: Path, settings: dict[str, Any]) -> EngineRunner:
        return cls.compile((directory / cls.file_names[0]).read_bytes(), settings)


ENGINES: dict[str, Any] = {"openvino": OpenVINOEngine, "onnxruntime": OnnxRuntimeEngine}


def get_engine(name: str) -> Any:
    """The engine class registered under ``name`` (``"openvino"`` or ``"onnxruntime"``)."""
    if name not in ENGINES:
        raise ValueError(f"deploy: engine must be one of {sorted(ENGINES)}, got {name!r}")
    return ENGINES[name]
