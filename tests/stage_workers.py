"""Rank functions of tests/test_stage_runner.py (module level: run_distributed pickles them by name)."""


def pretrain_recording_loader_args(overrides):
    """A mock-data pretrain run; returns the keyword arguments every data iterator was built with."""
    import megatron_bluelm.data as data
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.pretrain import run_pretrain

    seen, original = [], data.build_data_iterator

    def recording(dataset, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if k in ("num_workers", "collate_fn")})
        return original(dataset, **kwargs)

    data.build_data_iterator = recording
    result = run_pretrain(load_config(None, overrides))
    return {"loader_args": seen, "steps": result["step"]}
