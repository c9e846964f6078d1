"""Shims for the Triton interpreter (TRITON_INTERPRET=1: the CPU path of the triton backend).

Four defects of Triton 3.6's interpreter would make the kernels fail or lie on CPU while the
compiled kernels are fine; the fixes only touch the interpreter:

* Scalar loop bounds are converted with ``int(array)``, but the interpreter's scalars are
  shape-(1,) numpy arrays, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be
  converted to Python scalars", triton-lang/triton#9171, fixed upstream after 3.6): take the
  single element explicitly, as upstream does.
* bfloat16 is stored as uint16 and ``tl.dot`` multiplies the raw bit patterns
  (triton-lang/triton#11584; upstream declines: "the interpreter does not support bf16"):
  widen bfloat16 operands to float32 (exact: the top half of a float32) before the matmul.

* Conversions to float8e4nv (the FP8 KV cache) round the mantissa without carrying into the
  exponent (31.13 becomes 16, not 32) and know no NaN (0x7f reads back as 480): convert to and
  from float8e4nv exactly, as the GPU does (cvt.rn.satfinite: round to nearest even, saturating
  at +-448, NaN kept), through torch's float8_e4m3fn.

* Casts from float32 to bfloat16 truncate instead of rounding to nearest even (the GPU's
  cvt.rn.bf16.f32): round them through torch.
"""

from __future__ import annotations

_MARK = "tandem_interpreter_fix"


def _fix_scalar_index(interpreter) -> None:
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # the scope restores in reverse order, so this override is undone before the original's
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    setattr(patch_lang_tensor, _MARK, True)
    interpreter._patch_lang_tensor = patch_lang_tensor


def _fix_bf16_dot(interpreter) -> None:
    import numpy as np
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    setattr(create_dot, _MARK, True)
    builder.create_dot = create_dot


def _fix_fp8e4nv_convert(interpreter) -> None:
    import numpy as np
    import torch
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    original = builder.create_fp_to_fp

    def to_float32(handle) -> np.ndarray:
        data, dtype = handle.data, handle.dtype.scalar
        if dtype == tl.bfloat16:  # stored as uint16: the top half of a float32
            return (data.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return data.astype(np.float32)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.float8e4nv and src_ty in (tl.float32, tl.float16, tl.bfloat16):
            x = np.clip(to_float32(src), -448.0, 448.0)  # satfinite; NaN stays NaN
            data = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interpreter.TensorHandle(data.reshape(src.data.shape), dst_ty)
        if src_ty == tl.float8e4nv and dst_ty in (tl.float32, tl.float16, tl.bfloat16):
            bits = torch.from_numpy(np.ascontiguousarray(src.data).view(np.uint8))
            x = bits.view(torch.float8_e4m3fn).float()  # exact (NaN included)
            if dst_ty == tl.float32:
                data = x.numpy()
            elif dst_ty == tl.float16:
                data = x.half().numpy()
            else:
                data = x.bfloat16().view(torch.uint16).numpy()
            return interpreter.TensorHandle(data.reshape(src.data.shape), dst_ty)
        return original(self, src, dst_type, rounding_mode)

    setattr(create_fp_to_fp, _MARK, True)
    builder.create_fp_to_fp = create_fp_to_fp

    trunc = builder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            # round to nearest even, as the GPU's cvt.rn.bf16.f32 (the interpreter truncates)
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            data = x.bfloat16().view(torch.uint16).numpy()
            return interpreter.TensorHandle(data.reshape(src.data.shape), dst_type.scalar)
        return trunc(self, src, dst_type)

    setattr(create_fp_trunc, _MARK, True)
    builder.create_fp_trunc = create_fp_trunc


def fix_interpreter() -> None:
    """Applies the fixes once (idempotent); a Triton without these internals is left alone."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a triton without an interpreter
        return
    tensor_patch = getattr(interpreter, "_patch_lang_tensor", None)
    if tensor_patch is not None and not getattr(tensor_patch, _MARK, False):
        _fix_scalar_index(interpreter)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    dot = getattr(builder, "create_dot", None)
    if dot is not None and hasattr(interpreter, "TensorHandle") and not getattr(dot, _MARK, False):
        _fix_bf16_dot(interpreter)
    convert = getattr(builder, "create_fp_to_fp", None)
    if convert is not None and hasattr(interpreter, "TensorHandle") and not getattr(convert, _MARK, False):
        _fix_fp8e4nv_convert(interpreter)
