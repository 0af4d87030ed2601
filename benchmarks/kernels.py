"""Kernel-level checks behind the cpu-w8a8 lowering choices: one ORT graph per variant, timed interleaved in one
process (2 threads, spinning off), BERT-base shapes (hidden 768, intermediate 3072, sequence 128).

    python -m benchmarks.kernels            # prints one line per variant: median ms and ratio to the group's first

Groups: weight zero points (per column / none), the bias outside (ORT's Q/DQ fusion: MatMulIntegerToFloat +
BiasGelu) or inside the integer GEMM (+ Gelu), Q/K/V as three GEMMs or one, MatMulNBits 4-bit at accuracy levels
4 (int8 compute, activations requantized per block) and 1 (fp32) against MatMulIntegerToFloat, and the CPU
MultiHeadAttention with and without a key padding mask.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.run import time_interleaved
from qbert_deploy.runtimes.session import session_options

HIDDEN, FFN, SEQ, HEADS = 768, 3072, 128, 12
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
_rng = np.random.default_rng(0)


def _model(nodes: list, inputs: list, arrays: dict[str, np.ndarray], outputs: Sequence[str] = ("y",)) -> bytes:
    graph = helper.make_graph(nodes, "kernel", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


def _x(k: int = HIDDEN) -> list:
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])]


def _weights(prefix: str, k: int, n: int, zero_point: bool) -> dict[str, np.ndarray]:
    arrays = {f"{prefix}w": _rng.integers(-4, 4, size=(k, n)).astype(np.int8),
              f"{prefix}s": ((_rng.random(n) + 0.5) * 1e-2).astype(np.float32),
              f"{prefix}b": _rng.standard_normal(n).astype(np.float32),
              f"{prefix}as": np.array(0.03, np.float32), f"{prefix}az": np.array(128, np.uint8)}
    if zero_point:
        arrays[f"{prefix}z"] = _rng.integers(-3, 4, size=n).astype(np.int8)
    return arrays


def _qdq_gemm(prefix: str, zero_point: bool, out: str) -> list:
    """The canonical form ORT fuses itself: own activation Q/DQ, weight DQ, MatMul, bias Add."""
    weight = [f"{prefix}w", f"{prefix}s"] + ([f"{prefix}z"] if zero_point else [])
    act = [f"{prefix}as", f"{prefix}az"]
    return [helper.make_node("QuantizeLinear", ["x", *act], [f"{prefix}xq"]),
            helper.make_node("DequantizeLinear", [f"{prefix}xq", *act], [f"{prefix}xd"]),
            helper.make_node("DequantizeLinear", weight, [f"{prefix}wd"], axis=1),
            helper.make_node("MatMul", [f"{prefix}xd", f"{prefix}wd"], [f"{prefix}mm"]),
            helper.make_node("Add", [f"{prefix}mm", f"{prefix}b"], [out])]


def _gelu(x: str, y: str) -> tuple[list, dict[str, np.ndarray]]:
    """The exporter's erf GELU, which ORT fuses into Gelu (BiasGelu when a bias Add precedes it)."""
    nodes = [helper.make_node("Div", [x, "sqrt2"], ["g_d"]), helper.make_node("Erf", ["g_d"], ["g_e"]),
             helper.make_node("Add", ["g_e", "one"], ["g_a"]), helper.make_node("Mul", [x, "g_a"], ["g_m"]),
             helper.make_node("Mul", ["g_m", "half"], [y])]
    return nodes, {"sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32),
                   "half": np.array(0.5, np.float32)}


def zero_point_models(n: int) -> dict[str, bytes]:
    return {f"N={n} per-column weight zero point":
            _model(_qdq_gemm("", True, "y"), _x(), _weights("", HIDDEN, n, True)),
            f"N={n} no weight zero point": _model(_qdq_gemm("", False, "y"), _x(), _weights("", HIDDEN, n, False))}


def bias_models() -> dict[str, bytes]:
    arrays = _weights("", HIDDEN, FFN, False)
    gelu, constants = _gelu("pre", "y")
    inside = helper.make_node("MatMulIntegerToFloat", ["xq", "w", "as", "s", "az", "", "b"], ["pre"],
                              domain="com.microsoft")
    quantize = helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"])
    return {"FFN1 bias outside (MatMulIntegerToFloat + BiasGelu)":
            _model(_qdq_gemm("", False, "pre") + gelu, _x(), {**arrays, **constants}),
            "FFN1 bias inside MatMulIntegerToFloat (+ Gelu)":
            _model([quantize, inside, *gelu], _x(), {**arrays, **constants})}


def qkv_models() -> dict[str, bytes]:
    """What cpu-w8a8 writes (three integer GEMMs sharing one quantizer) against one GEMM N=2304 and a Split."""
    arrays = _weights("", HIDDEN, 3 * HIDDEN, False)
    quantize = helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"])
    three = [quantize] + [helper.make_node("MatMulIntegerToFloat", ["xq", f"w{i}", "as", f"s{i}", "az"], [f"y{i}"],
                                           domain="com.microsoft") for i in range(3)]
    parts = {f"{name}{i}": part for name in ("w", "s") for i, part in
             enumerate(np.split(arrays[name], 3, axis=-1))}
    one = [quantize, helper.make_node("MatMulIntegerToFloat", ["xq", "w", "as", "s", "az"], ["qkv"],
                                      domain="com.microsoft"),
           helper.make_node("Split", ["qkv", "widths"], ["y0", "y1", "y2"], axis=-1)]
    outputs = ("y0", "y1", "y2")
    return {"Q, K, V as 3 GEMMs N=768, one quantizer": _model(three, _x(), {**arrays, **parts}, outputs),
            "Q, K, V as 1 GEMM N=2304 + Split":
            _model(one, _x(), {**arrays, "widths": np.array([HIDDEN] * 3, np.int64)}, outputs)}


def nbits_models() -> dict[str, bytes]:
    block = 128
    q = _rng.integers(0, 16, size=(FFN, HIDDEN // block, block)).astype(np.uint8)
    arrays = {"w": (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8),
              "s": ((_rng.random(FFN * HIDDEN // block) + 0.5) * 1e-2).astype(np.float32),
              "z": np.full(FFN * ((HIDDEN // block + 1) // 2), 0x88, np.uint8)}
    out = {f"N={FFN} MatMulIntegerToFloat (int8 weights)":
           _model(_qdq_gemm("", False, "y"), _x(), _weights("", HIDDEN, FFN, False))}
    for level in (4, 1):
        node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft", K=HIDDEN, N=FFN,
                                bits=4, block_size=block, accuracy_level=level)
        out[f"N={FFN} MatMulNBits 4-bit accuracy_level={level}"] = _model([node], _x(), arrays)
    return out


def attention_models() -> dict[str, bytes]:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", HIDDEN]) for n in ("x", "k", "v")]
    mask = helper.make_tensor_value_info("mask", TensorProto.INT32, ["B", "S"])
    arrays = {"bias": _rng.standard_normal(3 * HIDDEN).astype(np.float32)}

    def mha(extra: list[str]) -> list:
        return [helper.make_node("MultiHeadAttention", ["x", "k", "v", "bias", *extra], ["y"],
                                 domain="com.microsoft", num_heads=HEADS, scale=0.125)]

    return {"MultiHeadAttention, key padding mask": _model(mha(["mask"]), [*inputs, mask], arrays),
            "MultiHeadAttention, no mask": _model(mha([]), inputs, arrays)}


def _time(models: dict[str, bytes], batch: int, rounds: int, threads: int) -> list[str]:
    runners: dict[str, Callable[[dict[str, np.ndarray]], object]] = {}
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for label, model in models.items():
        session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
        feed = {}
        for arg in session.get_inputs():
            if arg.name == "mask":
                feed[arg.name] = np.ones((batch, SEQ), np.int32)
            else:
                feed[arg.name] = _rng.standard_normal((batch, SEQ, int(arg.shape[2]))).astype(np.float32)
        feeds[label] = feed
        runners[label] = (lambda s, f: lambda _: s.run(None, f))(session, feed)
    times = time_interleaved(runners, {}, rounds)
    first = float(np.median(next(iter(times.values()))[0]))
    return [f"M={batch * SEQ:5d}  {label:58s} {np.median(wall) * 1e3:8.3f} ms  {np.median(wall) / first:.3f}x"
            for label, (wall, _) in times.items()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8", help="batches of 128 tokens (GEMM rows M = 128 x batch)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    groups = [zero_point_models(HIDDEN), zero_point_models(FFN), bias_models(), qkv_models(), nbits_models(),
              attention_models()]
    for batch in (int(b) for b in args.batches.split(",")):
        for models in groups:
            print("\n".join(_time(models, batch, max(3, args.rounds // batch), args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
