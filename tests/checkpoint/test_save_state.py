"""The distributed optimizer's save state built on the device (training/optimizer_state.py) equals
megatron-core's ``fully_reshardable`` one: same ShardedTensors, same data, the same shard files."""
from distributed import free_port, run_distributed
from save_state_workers import compare_save_states


def test_device_built_optimizer_state_equals_megatron_cores(tmp_path):
    """DP2 (the all-gather path, non-saving replicas without data) and TP2 x DP1 (the no-copy path,
    TP-replicated norms): every ShardedTensor's metadata and every main replica's data match, the
    shard files written are byte-identical, and a save never calls megatron-core's host round trip
    (``get_parameter_state_dp_zero``, which is what made the save block for tens of seconds)."""
    rank0 = {}
    for tp in (1, 2):  # one process group per layout (megatron-core's validation misreads a second one)
        results = run_distributed(compare_save_states, 2, [(tp, free_port())], str(tmp_path))
        for rank, (r,) in enumerate(results):
            assert r["diffs"] == [], (rank, r["tp"], r["diffs"][:10])
            assert r["compared"] > 0, (rank, r)
        rank0[tp] = results[0][0]
        assert rank0[tp]["main_replicas"] > 0, rank0[tp]
    assert rank0[1]["dp"] == 2 and rank0[2]["dp"] == 1
    for r in rank0.values():
        assert r["files"] and r["same_files"], r
