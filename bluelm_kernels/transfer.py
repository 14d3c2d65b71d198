"""Host -> device copies that never make the host wait."""
import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait: a copy to CUDA from pageable host memory is
    staged by the driver and waits for the stream to reach it (the device's whole queue, e.g. the
    previous micro-batch's backward), so CPU tensors are page-locked first unless they already are.
    The values are the same either way."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)
