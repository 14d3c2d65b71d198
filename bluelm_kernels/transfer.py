"""Host -> device copies that never make the host wait, and the key of what the host knows about a
device tensor."""
import torch


def tensor_key(t: torch.Tensor) -> tuple:
    """The identity of ``t``'s values for a cache of facts computed on the host (from the loader's CPU
    copy) about a device tensor: its storage address, shape, strides, device and version counter (a
    view or ``detach()`` of the same tensor has the same key; an in-place write changes it). A cache
    must keep ``t`` alive while it holds the key, so no other tensor can take its address."""
    try:
        version = t._version
    except RuntimeError:  # inference tensors keep no version counter (and are not written outside inference)
        version = -1
    return t.data_ptr(), tuple(t.shape), t.stride(), t.device, version


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait: a copy to CUDA from pageable host memory is
    staged by the driver and waits for the stream to reach it (the device's whole queue, e.g. the
    previous micro-batch's backward), so CPU tensors are page-locked first unless they already are.
    The values are the same either way."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)
