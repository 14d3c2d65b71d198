"""Plain-PyTorch RMSNorm with megatron-core's norm-module signature ``(config, hidden_size, eps)``.

megatron-core's own torch fallback (``WrappedTorchNorm``) refuses sequence parallelism; this one marks
its weight ``sequence_parallel`` so ``finalize_model_grads`` all-reduces its gradient over TP, exactly
as the Transformer Engine and fused-kernel norms do. Same parameter name (``weight``) in every backend,
so checkpoints are interchangeable.
"""
import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype; the output keeps the input dtype.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * self.weight.float()).to(x.dtype)
