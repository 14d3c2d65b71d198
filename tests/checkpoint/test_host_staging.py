"""The Checkpointer's own host buffers for saves (training/host_staging.py): same files as megatron-core's
copy, a snapshot the next steps cannot change, reused across saves, sized in advance exactly."""
import mmap
import os
from collections import Counter

import pytest
import torch
from distributed import run_distributed
from staging_workers import staged_saves

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config
from megatron_bluelm.config.validate import validate
from megatron_bluelm.training.host_staging import ALIGN, SEGMENT_BYTES, HostStaging, aligned, layout


def test_staged_saves_write_megatron_cores_bytes_from_reused_buffers(tmp_path):
    """One rank, the distributed optimizer, one step: a blocking save through host buffers reserved in
    the background from ``staged_sizes`` and an async one through the same buffers (the weights and Adam
    moments changed in place while its forked writer waits) write shard files byte-identical to
    megatron-core's own save; the reservation was exact (no growth in either save, same segments), and a
    save while the buffers are held by a writer is refused."""
    r = run_distributed(staged_saves, 1, str(tmp_path))[0]
    assert r["files"]["mcore"] and r["files"]["staged"] == r["files"]["mcore"], r["files"]
    assert r["staged_same"], "a blocking save through the host buffers wrote different bytes"
    assert r["async_same"], "the async writer saw the steps after the save (the buffers are not a snapshot)"
    assert r["reserved"]["reserved_bytes"] > 0 and r["reserved"]["segments"] > 0, r["reserved"]
    assert r["stats"]["grown_in_save_bytes"] == 0 and r["same_segments"], (r["reserved"], r["stats"])
    assert r["stats"]["saves"] == 2 and r["stats"]["pinned_bytes"] == 0  # CPU: pageable
    assert "previous save" in r["busy_error"]


def test_layout_depends_on_sizes_only_and_fits_large_tensors():
    sizes = [5000, 3 * SEGMENT_BYTES // 2, 10, 70_000_000, 4096, 0, 70_000_000]
    place, new = layout(sizes, [])
    rest = sum(aligned(n) for n in sizes) - 3 * SEGMENT_BYTES // 2
    assert new == [3 * SEGMENT_BYTES // 2, rest]  # the large tensor alone, the rest packed in one (< 256 MiB)
    again, more = layout(list(reversed(sizes)), new)
    assert more == [] and Counter(zip(reversed(sizes), again)) == Counter(zip(sizes, place))
    for (seg, off), n in zip(place, sizes):
        assert off % ALIGN == 0 and (seg is None if n == 0 else off + n <= new[seg])
    spans = sorted((seg, off, off + n) for (seg, off), n in zip(place, sizes) if n)
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))  # no overlaps
    _, grow = layout(sizes + [SEGMENT_BYTES], new)
    assert grow == [SEGMENT_BYTES]


def test_buffers_are_shared_with_a_forked_writer_and_tensors_own_their_bytes():
    """A staged tensor's storage is exactly its bytes (a checkpoint stores the whole storage), laid out
    like ``tensor.to('cpu')``; the pages are MAP_SHARED, so a forked child reads them without a copy."""
    staging = HostStaging(pin=True, device=torch.device("cpu"), log=print, threads=2)
    try:
        src = torch.arange(12.0).reshape(3, 4).t()  # dense, not contiguous: strides kept
        (_, _, (_, [(_, a), (_, b), (_, c)])), = staging.stage([("f", "k", ([], [("i", src), ("j", src[0]),
                                                                             ("z", torch.empty(0, 5))]))])
        assert torch.equal(a, src) and a.stride() == src.stride() and a.untyped_storage().nbytes() == 48
        assert torch.equal(b, src[0]) and b.stride() == (1,) and b.untyped_storage().nbytes() == 12
        assert c.shape == (0, 5)
        assert staging.stats["pinned_bytes"] == 0
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait for the parent's write, report what it sees
            os.read(r, 1)
            os._exit(int(a[0, 0].item()))
        a[0, 0] = 42.0
        os.write(w, b"x")
        assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 42
        seg, = staging._segments
        assert isinstance(seg.buf, mmap.mmap) and len(seg.buf) == 2 * ALIGN  # no rounding
    finally:
        staging.close()


def test_host_buffer_settings_are_validated():
    cfg = load_config(None, ["--data.mock", "true", "--checkpoint.host_buffers", "per_save",
                             "--checkpoint.host_buffers_at", "first_save"])
    with pytest.raises(ConfigError, match="checkpoint.host_buffers_at: 'first_save' applies to the run's own"):
        validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="checkpoint.host_buffers"):
        load_config(None, ["--checkpoint.host_buffers", "cuda"])


def test_a_failed_page_lock_leaves_the_buffers_pageable_and_the_training_thread_clean(monkeypatch):
    """cudaHostRegister failing (simulated) keeps the segment pageable, with the error in the report;
    the registration never runs in the saving thread, whose CUDA "last error" it would otherwise set
    (the next kernel-launch check there would then fail)."""
    import threading

    from megatron_bluelm.training import host_staging

    callers = []

    def failing_pin(seg):
        callers.append(threading.get_ident())
        return "cudaHostRegister of 8192 bytes failed: fake"

    monkeypatch.setattr(host_staging._Segment, "pin", failing_pin)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    staging = HostStaging(pin=True, device=torch.device("cpu"), log=print, threads=1)
    staging.pin = True  # as on CUDA
    try:
        src = torch.arange(6.0)
        (_, _, (_, [(_, a)])), = staging.stage([("f", "k", ([], [("i", src)]))])
        assert torch.equal(a, src) and staging.pin_errors and staging.stats["pinned_bytes"] == 0
        assert "segments failed: cudaHostRegister of 8192 bytes failed: fake" in staging.describe()
        assert callers and threading.get_ident() not in callers
    finally:
        staging.close()


def test_a_rank_with_nothing_to_save_counts_its_reservation_as_made():
    """The Checkpointer sizes the buffers (a collective) until a reservation was asked for: a rank that
    saves no tensor (DP4 + distributed optimizer has such ranks) must not ask again at the next step,
    or it waits in that collective alone (test_faults' DP4 run hung so)."""
    staging = HostStaging(pin=False, device=torch.device("cpu"), log=print)
    assert not staging.started
    staging.reserve_in_background([0, 0])
    assert staging.started and not staging.reserving and staging.stats["segments"] == 0
    staging.close()
