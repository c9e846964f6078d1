"""Triton kernels behind the `triton` backend (registered in engine/kernels/triton_ops.py).

    elementwise.py          rms_norm, add_rms_norm, rotary_embedding, silu_and_mul, write_kv
    attention.py            paged decode (split-KV) and paged varlen prefill attention
    interpreter_compat.py   fixes to Triton 3.6's CPU interpreter, applied only under it

Every launcher takes the torch reference's arguments (engine/kernels/torch_ops.py is the
contract) and reads strides from the tensors it is given. Importing runs nothing but the
`@triton.jit` decorations (and, under TRITON_INTERPRET=1, the interpreter fixes); the
decorations are why TRITON_INTERPRET must be set before the first import to run on CPU.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from engine.kernels.triton.interpreter_compat import fix_interpreter

    fix_interpreter()
