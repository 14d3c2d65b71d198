"""Model-based reward: a scalar head on our decoder, pluggable into ``HybridReward(model_reward=...)``.

The reward model is the BlueLM decoder (embedding, layers, final norm) plus ``Linear(hidden, 1)`` read
at the last token of prompt + response. It runs on the ranks of one model replica (tensor parallel
works: the decoder's hidden states are replicated over TP after each layer); pipeline parallelism is
not supported for it. Train it with a pairwise (Bradley-Terry) loss, ``pairwise_loss`` below.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F


class ScalarRewardModel(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        if not (decoder.pre_process and decoder.post_process):
            raise ValueError("ScalarRewardModel needs the whole decoder on one pipeline stage (parallel.pp 1)")
        self.decoder = decoder
        self.head = torch.nn.Linear(decoder.config.hidden_size, 1, dtype=decoder.config.params_dtype)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] (right-padded), lengths [b] -> one scalar per row [b] (fp32)."""
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(b, s)
        hidden = self.decoder.embedding(input_ids=tokens, position_ids=positions)
        rope = self.decoder.rotary_pos_emb(s)
        hidden = self.decoder.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)  # [s, b, h]
        last = hidden[lengths.to(tokens.device) - 1, torch.arange(b, device=tokens.device)]
        return self.head(last).squeeze(-1).float()

    def as_reward(self, tokenizer, encode_prompt: Callable[[Mapping], list[int]]):
        """A ``model_reward(responses, samples)`` callable scoring prompt + response text."""

        @torch.no_grad()
        def score(responses: Sequence[str], samples: Sequence[Mapping]) -> list[float]:
            rows = [encode_prompt(s) + tokenizer.encode(r) for r, s in zip(responses, samples)]
            lengths = torch.tensor([max(len(r), 1) for r in rows])
            tokens = torch.full((len(rows), int(lengths.max())), tokenizer.pad, dtype=torch.long)
            for i, r in enumerate(rows):
                tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            device = self.head.weight.device
            was_training = self.training
            self.eval()
            out = self(tokens.to(device), lengths).cpu().tolist()
            self.train(was_training)
            return out

        return score


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), averaged."""
    return -F.logsigmoid(chosen - rejected).mean()
