"""The distributed optimizer's save state built on the device (training/optimizer_state.py) equals
megatron-core's ``fully_reshardable`` one: same ShardedTensors, same data, the same shard files."""
from distributed import free_port, run_distributed
from save_state_workers import compare_save_states


def test_device_built_optimizer_state_equals_megatron_cores(tmp_path):
    """DP2 (the all-gather path; the non-saving rank's entries without data): every ShardedTensor's
    metadata and every main replica's data match, the shard files written are byte-identical, and a
    save never calls megatron-core's host round trip (``get_parameter_state_dp_zero``, which made the
    save block for tens of seconds). The DP1 path (the state tensors themselves, no copy) is what every
    single-rank and TP x PP distributed-optimizer resume test saves with, resuming bit-identically."""
    results = run_distributed(compare_save_states, 2, [(1, free_port())], str(tmp_path))
    for rank, (r,) in enumerate(results):
        assert r["dp"] == 2 and r["diffs"] == [], (rank, r["diffs"][:10])
        assert r["compared"] > 0, (rank, r)
    rank0 = results[0][0]
    assert rank0["main_replicas"] > 0 and rank0["files"] and rank0["same_files"], rank0
