"""experiments.bench_engine's pieces that need no GPU."""

import pytest

from experiments.bench_engine import kernel_kind


@pytest.mark.parametrize(
    "name, kind",
    [
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
            "attention",
        ),
        ("_prefill_gather_kernel", "attention"),
        ("_prefill_kernel", "attention"),
        ("_decode_fma_kernel", "attention"),
        ("_merge_kernel", "attention"),
        ("_merge_splits_kernel", "attention"),
        ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
        ("_rms_norm_kernel", "norm"),
        ("_rotary_write_kv_kernel", "rotary/kv write"),
        ("_silu_and_mul_kernel", "activation"),
        ("_dequant_blocks_kernel", "kv copy"),
        ("Memset (Device)", "other"),
    ],
)
def test_the_profile_files_each_kernel_of_a_prefill_under_its_kind(name: str, kind: str) -> None:
    """The kernels of a profiled 8B prefill on an H100 (docs/perf.md, 2026-12-07, fifth session): Triton's
    prefill attention over a gathered context and the cuDNN route's merge were filed under "other"."""
    assert kernel_kind(name) == kind
