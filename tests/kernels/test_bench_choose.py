"""The kernel benchmark's sweep keeps the fastest launch shape per phase, and for the RMSNorm
backward per case (plain / with the residual's gradient): each case's own fastest variant."""

import pytest

bench = pytest.importorskip("bluelm_kernels.bench.bench_kernels")


def test_rmsnorm_backward_cases_keep_their_own_fastest_shape(monkeypatch):
    keys = ("fwd_rows", "bwd_warps", "bwd_rows", "bwd_per_sm", "bwd_stages", "bwd_res_rows",
            "bwd_res_per_sm", "bwd_res_stages")
    deep = dict(zip(keys, (1, 8, 1, 1, 6, 1, 1, 6)))
    wide = dict(zip(keys, (2, 8, 1, 2, 3, 1, 2, 3)))
    ops = []
    # (variant, op, phase, ms): `deep` is faster for the plain backward, `wide` for the residual
    # one and for the forward; the bwd sum over both cases favours `wide`.
    for v, op, ph, ms in [(deep, "rmsnorm", "fwd", 0.032), (deep, "rmsnorm+res", "fwd", 0.060),
                          (deep, "rmsnorm", "bwd", 0.0495), (deep, "rmsnorm+res", "bwd", 0.0662),
                          (wide, "rmsnorm", "fwd", 0.031), (wide, "rmsnorm+res", "fwd", 0.059),
                          (wide, "rmsnorm", "bwd", 0.0512), (wide, "rmsnorm+res", "bwd", 0.0639)]:
        ops.append({"op": op, "impl": f"ours[{bench._tag(v)}]", "phase": ph, "ms": ms})
    monkeypatch.setattr(bench, "RESULTS", {"ops": ops})
    tune = {}
    bench.choose("rmsnorm", [deep, wide], tune)
    assert tune["fwd_rows"] == 2  # forward: the faster sum
    assert (tune["bwd_per_sm"], tune["bwd_stages"]) == (1, 6)  # plain case: deep
    assert (tune["bwd_res_per_sm"], tune["bwd_res_stages"]) == (2, 3)  # residual case: wide
    assert bench.RESULTS["chosen"]["rmsnorm"] == tune
