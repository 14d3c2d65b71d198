"""Host memory a checkpoint save copies the device state into, owned by the run and reused by every save.

A save hands host copies of its tensors to the writer (a forked process for an async save), and the
training process waits for that copy. megatron-core's own copy (``FileSystemWriterAsync.preload_tensors``)
allocates new pinned blocks each save from PyTorch's caching host allocator: page-locking ~32 GiB (the
2.44B decoder with its Adam state) took 37.5 s of a 42 s async save call on an H200, and that allocator
rounds every block up to a power of two (an FFN weight's 70.8 MB takes 128 MiB page-locked).

``HostStaging`` keeps its own buffers instead (docs/CHECKPOINTS.md, "Host staging buffers"):

* segments of ``MAP_SHARED`` anonymous memory, allocated once, reused by every save. Shared, so a forked
  writer reads these very pages: Linux copies *private* pages pinned for DMA into the child at fork (a
  32 GiB copy per save), and write-protects private ones for copy-on-write (a fault per page at the next
  save). Tensors are placed first-fit by decreasing size, so the placement depends only on the tensor
  sizes: buffers reserved from an estimate (``staged_sizes``) serve the save exactly when it matches.
* prefaulted by several threads, then page-locked on CUDA with ``cudaHostRegister`` one segment at a
  time (a segment is at most ``SEGMENT_BYTES`` unless one tensor is larger), the way PyTorch's
  ``pinned_use_cuda_host_register`` allocates but without its power-of-two rounding; a failed
  registration leaves that segment pageable (correct, slower copies) and is reported.
* optionally reserved in a background thread (``reserve_in_background``), so that the first save finds
  them ready.

The buffers hold one save at a time: ``stage`` refuses while a writer may still read them, and the
Checkpointer calls ``release`` only once that save's writer has been joined.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch

ALIGN = 4096  # each tensor starts on a page: DMA-friendly, and a tensor never shares a page with another
SEGMENT_BYTES = 256 << 20  # one mmap + one cudaHostRegister each: bounds how long one driver call runs
PAGE = 4096


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def layout(sizes: list[int], capacities: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Place tensors of ``sizes`` bytes into segments of ``capacities`` bytes: first fit, largest tensor
    first. Returns (segment index, byte offset) per size, and the capacities of the segments that must be
    added: ``SEGMENT_BYTES`` each (less when less is left to place; one tensor's size if that is larger)."""
    caps, used = list(capacities), [0] * len(capacities)
    place: list = [None] * len(sizes)
    left = sum(aligned(n) for n in sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need = aligned(sizes[i])
        if need == 0:  # an empty tensor takes no space (and needs no segment)
            place[i] = (None, 0)
            continue
        seg = next((s for s in range(len(caps)) if used[s] + need <= caps[s]), None)
        if seg is None:
            caps.append(max(min(SEGMENT_BYTES, left), need))
            used.append(0)
            seg = len(caps) - 1
        place[i] = (seg, used[seg])
        used[seg] += need
        left -= need
    return place, caps[len(capacities):]


def staged_sizes(sharded_state_dict) -> list[int]:
    """Bytes of every tensor a save of ``sharded_state_dict`` hands to the writer on this rank: the main
    replicas of its ShardedTensors (megatron-core's torch_dist save keeps only those), factories built."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    sizes: list[int] = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, ShardedTensorFactory):
            walk(x.build())
        elif isinstance(x, ShardedTensor) and is_main_replica(x.replica_id) and isinstance(x.data, torch.Tensor):
            sizes.append(x.data.numel() * x.data.element_size())

    walk(sharded_state_dict)
    return sizes


def _prefault(buf: mmap.mmap, threads: int) -> None:
    """Touch one byte per page from several threads (numpy's strided fill runs without the GIL), so the
    page faults run in parallel instead of inside the single-threaded registration."""
    pages = np.frombuffer(buf, dtype=np.uint8)[::PAGE]
    bounds = np.linspace(0, len(pages), threads + 1).astype(int)
    workers = [threading.Thread(target=pages[lo:hi].fill, args=(0,)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    del pages


class _Segment:
    def __init__(self, nbytes: int, threads: int):
        self.nbytes = nbytes
        self.buf = mmap.mmap(-1, nbytes)  # MAP_SHARED | MAP_ANONYMOUS: see the module docstring
        self.view = memoryview(self.buf)
        t0 = time.perf_counter()
        _prefault(self.buf, threads)
        self.prefault_s = time.perf_counter() - t0
        self.addr = torch.frombuffer(self.buf, dtype=torch.uint8, count=1).data_ptr()
        self.pinned = False
        self.register_s = 0.0

    def pin(self) -> Optional[str]:
        """Page-lock for fast device-to-host DMA; an error message, or None once pinned."""
        cudart = torch.cuda.cudart()
        t0 = time.perf_counter()
        err = cudart.cudaHostRegister(self.addr, self.nbytes, 0)
        self.register_s = time.perf_counter() - t0
        if err != cudart.cudaError.success:
            return f"cudaHostRegister of {self.nbytes} bytes failed: {cudart.cudaGetErrorString(err)}"
        self.pinned = True
        return None

    def tensor(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        """A CPU tensor over ``[offset, offset + like's bytes)`` shaped and strided as ``like.to('cpu')``
        would be, whose storage is exactly those bytes (a checkpoint file stores a tensor's whole storage)."""
        nbytes = like.numel() * like.element_size()
        flat = torch.frombuffer(self.view[offset:offset + nbytes], dtype=like.dtype)
        return flat.as_strided(like.shape, torch.empty_like(like, device="meta").stride())

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.addr)
            self.pinned = False
        self.view.release()
        try:
            self.buf.close()
        except BufferError:  # a staged tensor is still referenced: the pages go when it does
            pass


class HostStaging:
    """The Checkpointer's host copies of the tensors it saves (module docstring)."""

    def __init__(self, pin: bool, device: torch.device, log: Callable[[str], None],
                 threads: Optional[int] = None):
        self.pin = pin and device.type == "cuda"
        self.device = device
        self.log = log
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        self._segments: list[_Segment] = []
        self._busy = False
        self._thread: Optional[threading.Thread] = None
        self._thread_error: Optional[BaseException] = None
        self._requested = False
        self._closing = False  # a reservation under way stops at its next segment
        self.stats = {"reserved_bytes": 0, "segments": 0, "pinned_bytes": 0, "prefault_s": 0.0,
                      "register_s": 0.0, "reserve_s": 0.0, "grown_in_save_bytes": 0, "saves": 0}
        self.pin_errors: list[str] = []

    # -- reservation

    @property
    def started(self) -> bool:
        """A reservation was asked for (the same on every rank, also one that needed no memory: the
        Checkpointer's sizing before it is a collective)."""
        return self._requested

    @property
    def reserving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def reserve(self, sizes: list[int], background: bool = False) -> None:
        """Make sure the buffers can hold tensors of ``sizes`` bytes, allocating what is missing; with
        ``background``, return at once (``stage`` waits). The allocation always runs in a thread of its
        own: a failed ``cudaHostRegister`` sets the calling thread's CUDA "last error", which the
        training thread's next kernel-launch check would report as its own failure."""
        self._requested = True
        self.wait()
        _, new = layout(sizes, [s.nbytes for s in self._segments])
        if not new:
            return
        self._thread = threading.Thread(target=self._allocate, args=(new,), name="checkpoint-host-buffers",
                                        daemon=True)
        self._thread.start()
        if not background:
            self._thread.join()
            if self._thread_error is not None:
                e, self._thread_error = self._thread_error, None
                raise e

    def reserve_in_background(self, sizes: list[int]) -> None:
        """Start reserving for ``sizes`` unless buffers were reserved already (or are being)."""
        if not self.started:
            self.reserve(sizes, background=True)

    def _allocate(self, capacities: list[int]) -> None:
        t0 = time.perf_counter()
        try:
            if self.pin:
                torch.cuda.set_device(self.device)  # the runtime's current device is per thread
            for nbytes in capacities:
                if self._closing:
                    break
                seg = _Segment(nbytes, self.threads)
                error = seg.pin() if self.pin else None
                if error:
                    self.pin_errors.append(error)
                self._segments.append(seg)
                self.stats["prefault_s"] += seg.prefault_s
                self.stats["register_s"] += seg.register_s
                self.stats["pinned_bytes"] += nbytes if seg.pinned else 0
        except BaseException as e:  # raised by reserve, or reported by wait (background)
            self._thread_error = e
        finally:
            self.stats["reserved_bytes"] = sum(s.nbytes for s in self._segments)
            self.stats["segments"] = len(self._segments)
            self.stats["reserve_s"] += time.perf_counter() - t0

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._thread_error is not None:
            e, self._thread_error = self._thread_error, None
            self.log(f"warning: reserving checkpoint host buffers in the background failed "
                     f"({type(e).__name__}: {e}); the save allocates them")

    def describe(self) -> str:
        s = self.stats
        if not self.pin:
            pinned = "pageable"
        elif s["pinned_bytes"] == s["reserved_bytes"]:
            pinned = "page-locked"
        else:
            pinned = (f"{s['pinned_bytes'] / 2**30:.2f} GiB page-locked ({len(self.pin_errors)} segments failed: "
                      f"{self.pin_errors[0] if self.pin_errors else 'unknown'})")
        return (f"{s['reserved_bytes'] / 2**30:.2f} GiB in {s['segments']} segments, {pinned}; "
                f"{s['reserve_s']:.2f} s (prefault {s['prefault_s']:.2f} s, page-lock {s['register_s']:.2f} s)")

    # -- saves

    def stage(self, write_buckets: list) -> list:
        """The request's preload: megatron-core's write buckets with every tensor replaced by its copy in
        these buffers (device tensors copied asynchronously, then one stream synchronization)."""
        if self._busy:
            raise RuntimeError("the checkpoint host buffers still hold the previous save, whose writer may be "
                               "reading them: a save must wait for the previous one to be finalized")
        self.wait()
        tensors = [t for _, _, (_, tensor_data) in write_buckets for _, t in tensor_data]
        sizes = [t.numel() * t.element_size() for t in tensors]
        before = self.stats["reserved_bytes"]
        self.reserve(sizes)
        grown = self.stats["reserved_bytes"] - before
        if grown and before:
            self.log(f"checkpoint host buffers grew by {grown / 2**30:.2f} GiB in the save (its tensors "
                     f"differ from those they were reserved for)")
        self.stats["grown_in_save_bytes"] += grown
        place, new = layout(sizes, [s.nbytes for s in self._segments])
        assert not new, new
        copies = iter([self._copy(t, *p) for t, p in zip(tensors, place)])
        out = [(file_name, key, (bytes_data, [(item, next(copies)) for item, _ in tensor_data]))
               for file_name, key, (bytes_data, tensor_data) in write_buckets]
        if any(t.is_cuda for t in tensors):
            torch.cuda.current_stream().synchronize()
        self.stats["saves"] += 1
        self._busy = True  # handed out: a writer may read them until release()
        return out

    def _copy(self, t: torch.Tensor, seg: int, offset: int) -> torch.Tensor:
        t = t.detach()
        if t.numel() == 0:
            return torch.empty_like(t, device="cpu")
        dst = self._segments[seg].tensor(offset, t)
        dst.copy_(t, non_blocking=True)
        return dst

    def release(self) -> None:
        """The save that holds the buffers is finalized (its writer was joined): the next may use them."""
        self._busy = False

    def close(self) -> None:
        self._closing = True
        self.wait()
        for seg in self._segments:
            seg.close()
        self._segments = []
        self._busy = False
        self.stats.update(reserved_bytes=0, segments=0, pinned_bytes=0)
