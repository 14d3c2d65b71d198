"""The splice finds its <image> slots in the loader's CPU tokens (no device sync before the ViT), with the
same decoder input as from the device tokens; training's forward step hands those CPU tokens over."""
import torch
from distributed import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

IMAGE = 5  # an id the random tokens below never take


class _NonzeroOnDeviceTokens(TorchDispatchMode):
    """Counts ``nonzero`` calls on ``tokens == ...`` masks of one given tensor (the model's input ids):
    on CUDA each is a wait for the device's whole queue."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens, self.masks, self.calls = tokens, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.eq and args[0] is self.tokens:
            self.masks.add(out.data_ptr())
        if func.overloadpacket is torch.ops.aten.nonzero and args[0].data_ptr() in self.masks:
            self.calls += 1
        return out


def _splice_with_and_without_host_tokens():
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.inference.model import build_inference_model

    cfg = load_config(None, ["--model.preset", "tiny", "--vision.preset", "vit-tiny", "--model.backend", "torch",
                             "--data.seq_length", "64"])
    cfg.vision.resolve()
    vlm = build_inference_model(cfg, 512, IMAGE).model
    per_tile = cfg.vision.tokens_per_tile
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 500, (2, 64), generator=gen)
    tokens[0, 3:3 + per_tile] = IMAGE  # one tile in each row, at different offsets
    tokens[1, 30:30 + per_tile] = IMAGE
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    out = {}
    for name, host in (("device", None), ("host", tokens.clone())):
        with torch.no_grad(), _NonzeroOnDeviceTokens(tokens) as probe:
            out[name] = vlm._decoder_input(tokens, None, pixels, host)
        out[name + "_nonzero"] = probe.calls
    return out


def test_splice_from_host_tokens_needs_no_device_nonzero_and_splices_the_same():
    got = run_distributed(_splice_with_and_without_host_tokens, 1)[0]
    assert got["device_nonzero"] == 1  # the probe sees the device-token path's nonzero
    assert got["host_nonzero"] == 0
    assert torch.equal(got["host"], got["device"])


def test_forward_step_gives_multimodal_models_the_cpu_tokens():
    from megatron_bluelm.training.step import make_forward_step

    seen = {}

    def model(tokens, position_ids, mask, **kwargs):
        seen.update(kwargs)
        return torch.zeros(())

    host = {"tokens": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long),
            "loss_mask": torch.ones(1, 8), "position_ids": torch.arange(8)[None]}
    make_forward_step(torch.device("cpu"))(iter([dict(host)]), model)
    assert "host_input_ids" not in seen  # text models take no such argument
    make_forward_step(torch.device("cpu"))(iter([dict(host, pixel_values=torch.zeros(0, 3, 4, 4))]), model)
    assert seen["host_input_ids"] is host["tokens"]
