"""tools/bench/decoder_profile.py sorts GPU kernels into the categories it reports."""
import importlib.util
import os
import sys

import pytest

_DIR = os.path.join(os.path.dirname(__file__), "..", "tools", "bench")


@pytest.fixture(scope="module")
def profile():
    sys.path.insert(0, _DIR)  # it imports multimodal_bench beside it
    try:
        spec = importlib.util.spec_from_file_location("decoder_profile", os.path.join(_DIR, "decoder_profile.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(_DIR)


@pytest.mark.parametrize("name,category", [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT", "matmul"),
    ("_rmsnorm_fwd_kernel", "norm+elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "norm+elementwise"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer"),
    ("Memcpy HtoD (Pageable -> Device)", "copy/memset"),
])
def test_kernel_categories(profile, name, category):
    assert profile.category(name) == category


def test_kernels_are_attributed_to_their_op_and_autograd_node(profile):
    from types import SimpleNamespace as NS

    node = NS(name="autograd::engine::evaluate_function: SplitBackward0", cpu_parent=None)
    split = NS(name="SplitBackward0", cpu_parent=node)
    cat = NS(name="aten::cat", cpu_parent=split, kernels=[NS(name="CatArrayBatchedCopy", duration=3000.0)])
    fwd = NS(name="aten::copy_", cpu_parent=NS(name="aten::contiguous", cpu_parent=None),
             kernels=[NS(name="elementwise_kernel", duration=1000.0), NS(name="elementwise_kernel", duration=1000.0)])
    rows = profile.kernels_by_op([split, cat, fwd, NS(name="aten::empty", cpu_parent=None, kernels=[])], n=2, top=5)
    assert rows == [("SplitBackward0 | aten::cat | CatArrayBatchedCopy", 1.5),
                    ("forward | aten::copy_ | elementwise_kernel", 1.0)]
