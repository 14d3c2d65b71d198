"""Model-based reward: the BlueLM decoder with a scalar head instead of the LM output layer.

The reward model is our decoder (embedding, layers, final norm) whose last pipeline stage ends in
``ScalarHead`` (``Linear(hidden, 1)``) in place of the vocabulary projection; read at the last token
of a row, it is the row's score. Because it is a plain megatron model chunk, it runs under every
TP x PP x DP layout through megatron-core's pipeline schedules, like the policy: trained with the
pairwise Bradley-Terry loss by ``stages/reward_model.py``, scored with in the RL stage.

What is scored: the prompt rendered *non-thinking* (the template's empty think block) followed by
the response's answer only (the text after ``</think>``), then end of turn. Reasoning is not judged,
so the policy cannot be rewarded for what its thinking says, and training pairs (prompt, chosen
answer, rejected answer) look exactly like what RL scores (``score_tokens`` builds both).
"""
from __future__ import annotations

from typing import Callable, List, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

HEAD_PREFIX = "output_layer."


class ScalarHead(torch.nn.Module):
    """The reward model's output layer: hidden [s, b, h] -> ([s, b, 1], None), the output layer's
    call signature. Its weights are replicated over tensor parallel (the final hidden states are);
    named ``weight`` / ``bias`` like the layer it replaces (megatron-core's state dict expects them)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return F.linear(hidden_states, self.weight, self.bias), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets)


def build_reward_model(cfg, vocab_size: int, *, pre_process: bool = True, post_process: bool = True,
                       vp_stage=None):
    """One reward-model chunk (the ``build_chunk`` of training/model_setup.py)."""
    from megatron_bluelm.models.decoder import build_decoder

    model = build_decoder(cfg, vocab_size, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
    if post_process:
        model.output_layer = ScalarHead(model.config.hidden_size, model.config.params_dtype)
    return model


def score_tokens(tok, record: Mapping, answer: str, seq_length: int) -> list[int]:
    """Token ids the reward model scores: non-thinking prompt + answer + end of turn (cut to fit)."""
    from megatron_bluelm.rl.rewards import answer_part
    from megatron_bluelm.rl.rollout import encode_prompt

    prompt = encode_prompt(tok, {k: v for k, v in record.items() if k != "images"}, thinking=False)
    ids = prompt + tok.encode(answer_part(answer).strip()) + [tok.special_ids["<|end|>"]]
    return ids[-seq_length:] if len(prompt) >= seq_length else ids[:seq_length]


def rows_to_batch(rows: Sequence[Sequence[int]], seq_length: int, pad: int) -> dict:
    n = len(rows)
    tokens = torch.full((n, seq_length), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    return {"tokens": tokens, "lengths": torch.tensor([max(len(r), 1) for r in rows]),
            "position_ids": torch.arange(seq_length).expand(n, seq_length).contiguous()}


def last_token_scores(output: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Model output [b, s, 1] (last stage) -> the score at each row's last token [b] (fp32)."""
    idx = (lengths.to(output.device) - 1).clamp(min=0)
    return output[torch.arange(output.shape[0], device=output.device), idx, 0].float()


def _forward(device, data_iterator, model):
    mb = next(data_iterator)
    out = model(mb["tokens"].to(device), mb["position_ids"].to(device), None)
    return out, mb


@torch.no_grad()
def score_rows(model: List[torch.nn.Module], rows: Sequence[Sequence[int]], *, seq_length: int, mbs: int,
               pad: int, device) -> torch.Tensor:
    """Scores [n] of token rows, identical on every rank of the model replica (computed on the last
    pipeline stage, then broadcast over the pipeline)."""
    n = len(rows)
    padded = list(rows) + [list(rows[-1])] * ((-n) % mbs)  # whole micro-batches
    batch = rows_to_batch(padded, seq_length, pad)
    mbs_list = [{k: v[i:i + mbs] for k, v in batch.items()} for i in range(0, len(padded), mbs)]

    def forward_step(it, m):
        out, mb = _forward(device, it, m)
        return out, lambda o, non_loss_data=False: last_token_scores(o, mb["lengths"]).cpu()

    for chunk in model:
        chunk.eval()
    outs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mbs_list), model=model,
        num_microbatches=len(mbs_list), seq_length=seq_length, micro_batch_size=mbs,
        forward_only=True, collect_non_loss_data=True)
    scores = torch.zeros(len(padded), dtype=torch.float32, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        scores = torch.cat(list(outs)).to(device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(scores, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return scores[:n].cpu()


def model_reward(model: List[torch.nn.Module], tok, *, seq_length: int, mbs: int, device) -> Callable:
    """A ``model_reward(responses, samples)`` for ``HybridReward``: scores each sample's answer."""

    def score(responses: Sequence[str], samples: Sequence[Mapping]) -> list[float]:
        rows = [score_tokens(tok, s, r, seq_length) for r, s in zip(responses, samples)]
        return score_rows(model, rows, seq_length=seq_length, mbs=mbs, pad=tok.pad, device=device).tolist()

    return score


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), averaged."""
    return -F.logsigmoid(chosen - rejected).mean()


def load_backbone(chunks, root: str) -> str:
    """Load an SFT / pretrain checkpoint's decoder into reward-model chunks; the scalar head keeps its
    initialization (the checkpoint's vocabulary projection is not used)."""
    from megatron.core import dist_checkpointing

    from megatron_bluelm.inference.loading import checkpoint_dir
    from megatron_bluelm.training.checkpointing import check_shapes, model_sharded_state_dict

    path = checkpoint_dir(root)
    sharded = model_sharded_state_dict(chunks)
    for sd in sharded.values():
        for key in [k for k in sd if k.startswith(HEAD_PREFIX)]:
            del sd[key]
    check_shapes(sharded, path)
    state = dist_checkpointing.load(sharded, path)
    for i, chunk in enumerate(chunks):
        missing, unexpected = getattr(chunk, "module", chunk).load_state_dict(state[f"model{i}"], strict=False)
        bad = [k for k in missing if not k.startswith(HEAD_PREFIX) and not k.endswith("_extra_state")]
        if bad or unexpected:
            raise RuntimeError(f"reward model backbone from '{path}': missing {bad}, unexpected {unexpected}")
    return path
