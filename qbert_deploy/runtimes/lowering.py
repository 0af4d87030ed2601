"""Runtime lowering: a canonical QDQ export -> a standalone ONNX file for the kernels one execution provider has.

Profiles (the name is written into the lowered file's metadata, `qbert.lowering`):

- `cpu-w8a8`: packed int2/int4 weights widened to int8 (same integers, same scales) through Casts that ORT folds
  at session start, so the file stays packed on disk; every encoder Linear is written as ORT's integer GEMM
  (com.microsoft.MatMulIntegerToFloat) with its bias inside (and no weight zero point when it is all zeros);
  Q, K and V share one activation quantizer when theirs are bitwise equal. Embeddings gather rows before
  dequantizing; the attention core becomes one MultiHeadAttention, always run with its key padding mask, so a
  row's logits do not depend on the batch it runs in (the unmasked flash kernel, taken only for batches without
  padding, sums in another order: `unmasked_attention_branch`, in no profile); residual Adds become Sum so ORT does
  not form its slower SkipLayerNormalization.
  3-bit weights are stored at 3 bits per value (bitpack.py), unpacked by plain ONNX ops that ORT folds too.
  Numerics: those of the canonical graph (up to float summation order in fused kernels); batch-invariant: a row's
  logits are bitwise the same alone, padded, or in any batch.
- `cpu-small`: the memory-first CPU profile (edge boxes, many models per server): weights stay at 2/4/8 bits in RAM
  (3-bit in 4-bit containers) in com.microsoft.MatMulNBits at accuracy level 4 (int8 compute, weights unpacked in
  registers); embeddings gather int8 rows before dequantizing (not folded by ORT); the attention core as in cpu-w8a8.
  Slower than cpu-w8a8 (packed kernels lose to the int8 GEMM at encoder sizes, DESIGN.md §4): the user chooses.
- `weight-only`: weights in com.microsoft.MatMulNBits (2-, 4- or 8-bit kernels), accuracy level pinned in the
  node (`accuracy_level=1`: fp32 compute); activation Q/DQ kept, so only the GEMM's float summation differs.
- `cuda`: the weight-only form with CUDA's rules: no int2 (2-bit runs in the 4-bit kernel), no blocked Q/DQ
  but int4, no integer GEMM kernels; the attention core as one MultiHeadAttention; sessions run with TF32 off.
- `cuda-fp16`: the `cuda` form with float tensors, scales and math in fp16 (the GPU's fast kernels): numerics
  differ from the canonical graph by fp16 rounding, by design.
- `cuda-fused`: the GPU profile built for speed. The 8-bit activation Q/DQ pairs are folded away (a numerics
  change: activations are no longer rounded to 8 bits; the accuracy gate checks it on the real model), then ORT's own
  BERT fusions (onnxruntime.transformers: SkipLayerNormalization with the bias inside, BiasGelu) run on that graph,
  the weights become MatMulNBits (packed 4-bit, 8-bit stays 8-bit), each layer's Q, K and V one MatMulNBits + Split,
  and float math goes to fp16.
  `cuda-fused-w8` is the same with every weight in the 8-bit kernel (same integers), for GPUs where that one is faster.
- `tensorrt`: 8-bit explicit quantization: int8 weights with zero point 0 (exact up to 7 bits), activations as
  symmetric int8 over the calibrated range (TensorRT has no zero points: this changes numerics, by design).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qbert_deploy.atomic import atomic_file
from qbert_deploy.runtimes.attention_fusion import fuse_attention
from qbert_deploy.runtimes.bitpack import pack_3bit_weights
from qbert_deploy.runtimes.graph_checks import blocked_int8_pitfalls, cuda_violations, weight_sites
from qbert_deploy.runtimes.integer_gemms import integer_matmuls
from qbert_deploy.runtimes.lowering_passes import (
    LoweringError,
    fold_activation_qdq,
    gather_then_dequantize,
    pack_qkv_matmulnbits,
    residual_sum,
    symmetric_activations,
    symmetric_weights,
    unpacked_weight_copies,
    weight_bits,
    weights_to_matmulnbits,
    widen_weights_to_int8,
)

__all__ = ["MATMULNBITS_ACCURACY_LEVEL", "MEMORY_FIRST", "MEMORY_FIRST_ACCURACY_LEVEL", "PROFILES", "LoweringError",
           "Profile", "default_profile", "lower", "lower_in_export", "lower_model", "lowered_path", "profile_info"]

MATMULNBITS_ACCURACY_LEVEL = 1  # fp32 compute: level 4 would quantize activations to int8 inside the kernel
MEMORY_FIRST_ACCURACY_LEVEL = 4  # int8 compute with the weights unpacked in registers: no wider copy in RAM
METADATA_KEY = "qbert.lowering"


@dataclass(frozen=True)
class Profile:
    name: str
    providers: tuple[str, ...]  # execution providers the lowered file is meant for
    numerics: str  # what, if anything, differs from the canonical graph
    passes: tuple[Callable[[ir.Model], int], ...]
    session_config: Mapping[str, str] = field(default_factory=dict)
    disabled_optimizers: tuple[str, ...] = ()
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # by ORT provider name


def matmulnbits(model: ir.Model) -> int:
    """weight-only: 2-bit weights keep ORT CPU's 2-bit MatMulNBits kernel."""
    return weights_to_matmulnbits(model, MATMULNBITS_ACCURACY_LEVEL, widen_2bit=False)


def matmulnbits_4bit(model: ir.Model) -> int:
    """cuda: 2-bit weights go to the 4-bit kernel (the one certain to exist on the CUDA EP)."""
    return weights_to_matmulnbits(model, MATMULNBITS_ACCURACY_LEVEL, widen_2bit=True)


def matmulnbits_int8_compute(model: ir.Model) -> int:
    """cpu-small: every encoder weight in a MatMulNBits kernel at its own width (2-bit in the 2-bit kernel, 3- and
    4-bit in the 4-bit one, 8-bit in the 8-bit one), accuracy level 4 (int8 compute), so ORT keeps the packed
    bits and nothing wider in RAM."""
    return weights_to_matmulnbits(model, MEMORY_FIRST_ACCURACY_LEVEL, widen_2bit=False)


def float16_compute(model: ir.Model) -> int:
    """cuda-fp16: float tensors, scales and math in fp16 (inputs and logits stay as they are), so MatMulNBits,
    MultiHeadAttention and LayerNorm take their fp16 GPU kernels. onnxruntime.transformers does the conversion."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = ir.from_proto(convert_float_to_float16(ir.to_proto(model), keep_io_types=True))
    model.graph = converted.graph
    return sum(1 for value in model.graph.initializers.values() if value.dtype == ir.DataType.FLOAT16)


def matmulnbits_8bit(model: ir.Model) -> int:
    """cuda-fused-w8: every weight in the 8-bit kernel (same integers; 2-, 3- and 4-bit ones widened)."""
    return weights_to_matmulnbits(model, MATMULNBITS_ACCURACY_LEVEL, widen_to_8bit=True)


def ort_transformer_fusions(model: ir.Model) -> int:
    """cuda-fused: ORT's own BERT fusions (onnxruntime.transformers) on the graph without activation Q/DQ:
    residual Add + LayerNormalization -> SkipLayerNormalization, the bias Adds into SkipLayerNormalization and
    BiasGelu. Run while each Linear is still DequantizeLinear -> MatMul, the form ORT's patterns match; the
    attention core is already our MultiHeadAttention (ORT's attention fusion needs float weights) and the
    embeddings keep their row-wise dequantization, so those two fusions are off. Returns the fused nodes made.
    The fused bias stays outside MatMulNBits: ORT's CUDA kernel refuses that input ("MatMulNBits does not support
    bias in CUDA kernel" in the ORT releases read for this profile), while SkipLayerNormalization and BiasGelu
    add it for free."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    options = FusionOptions("bert")
    options.enable_attention = False
    options.enable_embed_layer_norm = False
    options.enable_gelu_approximation = False  # FastGelu's tanh form would be a second numerics change
    before = {n.op_type for n in model.graph}
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        fused = BertOnnxModel(ir.to_proto(model), 0, 0)
        fused.optimize(options)
        fused.topological_sort()  # a fused node can land before its input when a layer's output is also a graph
        # output (an embedding model's last_hidden_state)
    finally:
        quiet.setLevel(level)
    model.graph = ir.from_proto(fused.model).graph
    model.opset_imports.setdefault("com.microsoft", 1)
    return sum(1 for n in model.graph if n.domain == "com.microsoft" and n.op_type not in before)


_FUSED = "activation 8-bit Q/DQ folded away (activations stay float: a numerics change, checked by the accuracy " \
    "gate); residual + LayerNorm, biases and Gelu in ORT's fused kernels; float math in fp16"

_PROFILES = {
    "cpu-w8a8": Profile(
        "cpu-w8a8", ("cpu",), "exact: same integers and scales as the canonical graph",
        (widen_weights_to_int8, gather_then_dequantize, fuse_attention, integer_matmuls, residual_sum,
         pack_3bit_weights)),
    "cpu-small": Profile(
        "cpu-small", ("cpu",),
        f"weights exact, held packed in RAM; MatMulNBits accuracy_level={MEMORY_FIRST_ACCURACY_LEVEL} (the "
        "kernel requantizes each Linear's input to int8 per block: within a few output steps, not bitwise)",
        (gather_then_dequantize, matmulnbits_int8_compute, fuse_attention, residual_sum),
        {"session.qdq_matmulnbits_accuracy_level": str(MEMORY_FIRST_ACCURACY_LEVEL)}),
    "weight-only": Profile(
        "weight-only", ("cpu", "cuda"),
        f"weights exact; MatMulNBits accuracy_level={MATMULNBITS_ACCURACY_LEVEL} (fp32 compute)",
        (gather_then_dequantize, matmulnbits),
        {"session.qdq_matmulnbits_accuracy_level": str(MATMULNBITS_ACCURACY_LEVEL)}),
    "cuda": Profile(
        "cuda", ("cuda", "cpu"),
        f"weights exact (2-bit in the 4-bit kernel); MatMulNBits accuracy_level={MATMULNBITS_ACCURACY_LEVEL}; "
        "fp32 GEMMs (TF32 off)",
        (gather_then_dequantize, matmulnbits_4bit, fuse_attention),
        {"session.qdq_matmulnbits_accuracy_level": str(MATMULNBITS_ACCURACY_LEVEL)},
        # ORT's CUDA EP computes fp32 GEMMs in TF32 by default: 10-bit mantissas, not the fp32 the profile promises
        provider_options={"CUDAExecutionProvider": {"use_tf32": "0"}}),
    "cuda-fp16": Profile(
        "cuda-fp16", ("cuda",),
        "weights exact (2-bit in the 4-bit kernel); activations, scales and float math in fp16",
        (gather_then_dequantize, matmulnbits_4bit, fuse_attention, float16_compute)),
    "cuda-fused": Profile(
        "cuda-fused", ("cuda",), f"weights exact (2-bit in the 4-bit kernel); {_FUSED}",
        (gather_then_dequantize, fuse_attention, fold_activation_qdq, ort_transformer_fusions, matmulnbits_4bit,
         pack_qkv_matmulnbits, float16_compute)),
    "cuda-fused-w8": Profile(
        "cuda-fused-w8", ("cuda",), f"weights exact, all in the 8-bit kernel; {_FUSED}",
        (gather_then_dequantize, fuse_attention, fold_activation_qdq, ort_transformer_fusions, matmulnbits_8bit,
         pack_qkv_matmulnbits, float16_compute)),
    "tensorrt": Profile(
        "tensorrt", ("tensorrt",),
        "weights exact as symmetric int8; activations requantized to symmetric int8 over the same range",
        (gather_then_dequantize, symmetric_weights, symmetric_activations)),
}
PROFILES: tuple[str, ...] = tuple(_PROFILES)
MEMORY_FIRST = ("cpu-small",)  # profiles whose postcondition is: no encoder matrix wider than its bits in RAM
_DEFAULT_FOR_PROVIDER = {"cpu": "cpu-w8a8", "cuda": "cuda", "tensorrt": "tensorrt"}


def profile_info(name: str) -> Profile:
    if name not in _PROFILES:
        raise LoweringError(f"unknown lowering profile {name!r}; choose from {', '.join(PROFILES)}")
    return _PROFILES[name]


def default_profile(provider: str) -> str:
    """The profile that runs fastest on an execution provider (`cpu`, `cuda`, `tensorrt`)."""
    if provider not in _DEFAULT_FOR_PROVIDER:
        raise LoweringError(f"no lowering profile for provider {provider!r}")
    return _DEFAULT_FOR_PROVIDER[provider]


def _check_canonical(model: ir.Model) -> list[str]:
    """Precondition: a canonical qbert export (not already lowered), each quantized Linear a DQ -> MatMul."""
    props = model.metadata_props
    if METADATA_KEY in props:
        done = json.loads(props[METADATA_KEY]).get("profile", "?")
        raise LoweringError(f"the model is already lowered (profile {done}); lower the canonical model.onnx")
    if "qbert.format_version" not in props:
        raise LoweringError("not a qbert-deploy export (no qbert.format_version metadata)")
    bits = weight_bits(model)
    found = {site.module for site in weight_sites(model.graph)}
    linears = [name for name in bits if ".embeddings." not in f".{name}."]
    missing = [name for name in linears if name not in found]
    if missing:
        raise LoweringError(f"{missing[0]}: no DequantizeLinear -> MatMul found for this quantized Linear")
    return linears


def _check_lowered(model: ir.Model, profile: Profile) -> None:
    """Postconditions every lowered graph must meet before it is written."""
    bad = blocked_int8_pitfalls(model.graph)
    if bad:
        raise LoweringError(f"{bad[0]}: blocked int8 weight + activation Q/DQ without Q after the MatMul "
                            "(ORT fuses this wrongly)")
    if profile.name in MEMORY_FIRST:
        wide = unpacked_weight_copies(model)
        if wide:
            raise LoweringError(f"cannot keep the weights packed: {wide[0]}")
    if profile.providers[0] == "cuda":
        problems = cuda_violations(model.graph)
        if problems:
            raise LoweringError(f"cannot lower for CUDA: {problems[0]}")


# Passes that only make the file on disk smaller; in memory they cost session-start time and RAM for nothing.
FILE_ONLY_PASSES = (pack_3bit_weights,)


def lower_model(model: ir.Model, profile: str, for_file: bool = True) -> dict[str, int]:
    """Lower `model` in place for `profile`; returns how many sites each pass rewrote.

    `for_file=False` (a model lowered in memory for a session) leaves out FILE_ONLY_PASSES.
    """
    info = profile_info(profile)
    linears = _check_canonical(model)
    counts = {}
    for rewrite in info.passes:
        if not for_file and rewrite in FILE_ONLY_PASSES:
            continue
        counts[rewrite.__name__.lstrip("_")] = rewrite(model)
    common_passes.RemoveUnusedNodesPass()(model)
    _check_lowered(model, info)
    model.metadata_props[METADATA_KEY] = json.dumps({
        "profile": info.name, "providers": list(info.providers), "numerics": info.numerics,
        "linears": len(linears), "passes": counts, "session_config": dict(info.session_config)}, sort_keys=True)
    return counts


def lowered_path(export_dir: str | os.PathLike[str], profile: str) -> Path:
    """Where `qbert-export --lower PROFILE` puts a profile's file: beside model.onnx."""
    return Path(export_dir) / f"model.{profile_info(profile).name}.onnx"


def lower(src: str | os.PathLike[str], profile: str, dst: str | os.PathLike[str], pack_3bit: bool = False) -> Path:
    """Write `src` (a canonical model.onnx) lowered for `profile` to `dst`, atomically; returns `dst`.

    3-bit weights stay in their int4 containers by default: ORT then unpacks nothing at session start. `pack_3bit`
    stores them at 3 bits per value (8 in 3 bytes): a smaller file, but the unpacking ORT folds at session start
    doubles the peak memory (BERT-base MP 2/3: 369 against 174 MiB, docs/results/memory.md).
    """
    profile_info(profile)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise LoweringError(f"{src}: no such model file")
    if src.resolve() == dst.resolve():
        raise LoweringError("the lowered file must not replace the canonical model")
    try:
        model = ir.load(src)
    except Exception as err:  # onnx raises DecodeError and others for a file that is not a model
        raise LoweringError(f"{src}: not a readable ONNX model ({type(err).__name__})") from None
    lower_model(model, profile, for_file=pack_3bit)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dst) as tmp:
        ir.save(model, tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # a model file, readable like model.onnx (the temporary file is 0600)
    return dst


def lower_in_export(export_dir: str | os.PathLike[str], profile: str, pack_3bit: bool = False) -> Path:
    """Add model.<profile>.onnx to an existing export directory, without torch: its model.onnx (checked against the
    sha256 recorded at export) lowered, and the new file's sha256 recorded in qbert_recipe.json, so that qbert-serve
    and `qbert-export --check` verify it like a file written by `qbert-export --lower`.

    A kill between the two writes leaves a lowered file without a record: refused by both, never trusted.
    """
    from qbert_deploy.runtimes.export_dir import model_files, record_files, verify_file

    folder = Path(export_dir)
    files = model_files(folder)
    if profile_info(profile).name == files.deployed:
        raise LoweringError(f"{folder}: a deployment folder whose model.onnx is already lowered for {profile}")
    verify_file(folder, files.canonical)
    path = lower(files.canonical, profile, lowered_path(folder, profile), pack_3bit=pack_3bit)
    record_files(folder, [path.name])
    return path
