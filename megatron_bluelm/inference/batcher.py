"""The generation engine: continuous batching over a per-slot KV cache, decode steps on the device.

    engine = GenerationEngine(model, device)          # the training model's chunk: same tensors
    outs = engine.generate(prompts, request, ids=..., vocab_size=..., max_context=...)

How a call runs:
1. Samples are grouped by prompt (the G samples of an RL group share one prefill: its keys and
   values are computed once and written into each sample's slot).
2. Slots are admitted lowest-first; a prefill writes the prompt minus its last token into the cache:
   prompts packed back to back in rows of ``prefill_tokens`` tokens, positions restarting per prompt,
   attention within each prompt (a prompt cut at a row's end continues at the head of the next row,
   attending to what its slot holds); ``pack_prefill=False``: right-padded rows of similar lengths in
   chunks of ``prefill_chunk`` positions. A small prefill (rows x length, bucketed to powers of two,
   up to ``small_prefill_tokens``; text prompts, one pipeline stage) is one CUDA graph per bucket
   instead: eager, one row of 128 tokens is host-bound (~1,000 launches). The last prompt token is
   the first decode input, so every generated token comes from the decode step.
3. Decode steps run ``check_every`` at a time with no host involvement: the step (embedding, layers,
   logits, sampling, budget, stop — ``decode_state.advance``) is one CUDA graph per batch bucket
   (PP = 1 on CUDA), replayed; then the host reads which rows finished, collects their tokens,
   log-probs and forced mask, and refills the freed slots with waiting prompts. A burst never runs
   past the rows' token limits (the host knows them); when no prompt waits, the next burst is queued
   before the host looks at the last one, so the device does not idle while it does.
4. When no prompt waits, the remaining rows are moved to the lowest slots so a smaller bucket runs.

Per row: its own token limit (``min(max_new_tokens, context - prompt)``), its own budget, its own
RNG stream. Pipeline parallel: each stage runs its layers on its own cache; hidden states go to the
next stage, and the last stage broadcasts the new tokens and row states to the others (eager, no
graphs). Tensor parallel: all-reduces inside the step (captured with it).
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_bluelm.inference import decode_state as ds
from megatron_bluelm.inference.decode_state import DecodeState, TokenTables, advance, sample_key
from megatron_bluelm.inference.errors import GenerationError
from megatron_bluelm.inference.kv_cache import KVCache
from megatron_bluelm.inference.stage import PackedRow, StageWeights

_REASONS = {ds.FINISH_STOP: "stop", ds.FINISH_LENGTH: "length", ds.FINISH_CONTEXT: "context"}


def sampling_mode(cfgs) -> str:
    """Which sampler the step graph needs: greedy only, plain sampling, or top-k / top-p filtering."""
    sampled = [c for c in cfgs if c["temperature"] > 0]
    if not sampled:
        return "greedy"
    return "filtered" if any(c["top_p"] < 1.0 or c["top_k"] > 0 for c in sampled) else "sample"


def _buckets(slots: int) -> list[int]:
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


def _prompt_state(prompt: Sequence[int], think: int, end_think: int) -> int:
    state = ds.BEFORE
    for t in prompt:
        if state == ds.BEFORE and t == think:
            state = ds.THINKING
        elif state == ds.THINKING and t == end_think:
            state = ds.CLOSED
    return state


class _Parallel:
    """This rank's place in the TP x PP layout (1 x 1 when torch.distributed / megatron is not set up)."""

    def __init__(self):
        self.tp_group = self.pp_group = self.mp_group = None
        self.first = self.last = True
        self.pp = 1
        try:
            from megatron.core import parallel_state as ps

            if not ps.model_parallel_is_initialized():
                return
        except ImportError:
            return
        if ps.get_tensor_model_parallel_world_size() > 1:
            self.tp_group = ps.get_tensor_model_parallel_group()
        if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
            self.mp_group = ps.get_model_parallel_group()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        if self.pp > 1:
            self.pp_group = ps.get_pipeline_model_parallel_group()
            self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
            self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
            self.prev = ps.get_pipeline_model_parallel_prev_rank()
            self.next = ps.get_pipeline_model_parallel_next_rank()
            self.last_rank = ps.get_pipeline_model_parallel_last_rank()


class GenerationEngine:
    def __init__(self, model: torch.nn.Module, device: torch.device, *, max_slots: int = 256,
                 cuda_graphs: bool | None = None, check_every: int = 8, prefill_tokens: int = 16384,
                 prefill_chunk: int = 4096, memory_fraction: float = 0.85, pack_prefill: bool = True,
                 small_prefill_tokens: int | None = None):
        self.par = _Parallel()
        self.w = StageWeights(model, self.par.tp_group)
        self.device = torch.device(device)
        self.dtype = self.w.dtype
        self.max_slots, self.check_every = max_slots, check_every
        self.prefill_tokens, self.prefill_chunk = prefill_tokens, prefill_chunk
        if prefill_tokens < 1:
            raise GenerationError(f"prefill_tokens must be at least 1, got {prefill_tokens}")
        self.pack_prefill = pack_prefill
        self.memory_fraction = memory_fraction
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.par.pp == 1
        if cuda_graphs and self.par.pp > 1:
            raise GenerationError("cuda_graphs: not supported with pipeline parallelism (the stages exchange "
                                  "hidden states between steps); use cuda_graphs=False")
        self.cuda_graphs = cuda_graphs
        # small prefills (rows x bucketed length up to this many tokens) run as captured graphs: eager,
        # one row of 128 tokens is ~1,000 launches of host time (~40 ms) for ~2 ms of GPU work. Each new
        # shape costs a capture (an eager run, the capture, a replay); larger prefills come in more
        # shapes and are less host-bound: at 2048 the H200's mixed-length workload (16-row refills)
        # spent 2.0 s in prefills vs 1.06 s eager, so the default stops at 1024
        if small_prefill_tokens is None:
            small_prefill_tokens = 1024 if cuda_graphs else 0
        if small_prefill_tokens < 0:
            raise GenerationError(f"small_prefill_tokens must be >= 0, got {small_prefill_tokens}")
        self.small_prefill_tokens = small_prefill_tokens
        self.prefill_graphs: dict = {}
        self.cache: KVCache | None = None
        self.state: DecodeState | None = None
        self.graphs: dict = {}
        self.pool = None
        # prefill_computed: the tokens the prefill's matmuls ran on (padding included), prefill_calls: rows
        self.stats = {"decode_steps": 0, "row_steps": 0, "prefill_tokens": 0, "graph_captures": 0,
                      "prefill_computed": 0, "prefill_calls": 0}
        self.timing, self._events, self._prefill_events = False, [], []

    # -- sizing -------------------------------------------------------------------------------------
    def _slots_for(self, samples: int, capacity: int) -> int:
        slots = min(self.max_slots, samples)
        if self.device.type == "cuda":
            per_slot = KVCache.bytes_per_slot(self.w.num_layers, self.w.groups, capacity, self.w.head_dim, self.dtype)
            held = 0 if self.cache is None else self.cache.k.numel() * self.cache.k.element_size() * 2
            free = torch.cuda.mem_get_info(self.device)[0] + held
            # headroom for the step's activations and logits ([slots, vocab] fp32, a few copies)
            vocab = self.state.vocab if self.state is not None else 0
            budget = free * self.memory_fraction - 8 * slots * (vocab * 4 + 64 * self.w.hidden)
            fit = int(budget // max(1, per_slot))
            if fit < 1:
                raise GenerationError(f"KV cache: one slot of {capacity} positions needs {per_slot / 2**30:.2f} GiB; "
                                      f"{free / 2**30:.1f} GiB are free")
            slots = min(slots, fit)
        if self.par.mp_group is not None:  # every rank of the replica must size (and capture) alike
            t = torch.tensor([slots], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.par.mp_group)
            slots = int(t)
        return slots

    def _ensure(self, slots: int, capacity: int, max_new: int, vocab: int) -> None:
        st, c = self.state, self.cache
        if c is not None and c.fits(slots, capacity) and st.max_new >= max_new and st.vocab == vocab:
            return
        slots = max(slots, c.slots if c is not None else 0)
        capacity = max(capacity, c.capacity if c is not None else 0)
        max_new = max(max_new, st.max_new if st is not None else 0)
        self.release()  # graphs hold the old buffers' addresses (and their memory pool)
        self.cache = KVCache(self.w.num_layers, slots, self.w.groups, capacity, self.w.head_dim,
                             self.dtype, self.device)
        self.state = DecodeState(slots, max_new, vocab, self.device)
        self.cos, self.sin = self.w.rope_tables(capacity)

    # -- one decode step ----------------------------------------------------------------------------
    def _forward(self, rows: int, mode: str) -> None:
        st = self.state
        if self.par.first:
            x = self.w.embed(st.token[:rows])
        else:
            x = torch.empty(rows, self.w.hidden, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self.par.prev)
        x = self.w.decode(x, st.pos[:rows], self.cache, self.cos, self.sin, rows)
        if not self.par.last:
            dist.send(x.contiguous(), dst=self.par.next)
        if self.par.last:
            advance(st, self.w.logits(x), rows, mode)
        if self.par.pp > 1:
            self._sync_rows(rows)

    def _sync_rows(self, rows: int) -> None:
        """PP: the last stage's new tokens and row states to every stage."""
        st = self.state
        names = ("token", "pos", "active", "gen", "finish", "bcount")
        packed = torch.stack([getattr(st, n)[:rows].long() for n in names])
        dist.broadcast(packed, src=self.par.last_rank, group=self.par.pp_group)
        if not self.par.last:
            for n, row in zip(names, packed):
                getattr(st, n)[:rows].copy_(row)

    def _graph(self, rows: int, mode: str):
        key = (rows, mode)
        if key not in self.graphs:  # the warm-up runs with all rows inactive: no row state changes
            self.graphs[key] = self._capture(lambda: self._forward(rows, mode))[0]
        return self.graphs[key]

    def _capture(self, fn):
        """Run ``fn`` once on a side stream (warm-up), then capture it in a CUDA graph in the engine's
        memory pool: (graph, what ``fn`` returned during the capture, its static output)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = fn()
        self.stats["graph_captures"] += 1
        return g, out

    def _decode(self, rows: int, mode: str, steps: int) -> None:
        timed = self.timing and self.device.type == "cuda"
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(steps):
            if self.cuda_graphs:
                self.graphs[(rows, mode)].replay()
            else:
                self._forward(rows, mode)
        if timed:
            end.record()
            self._events.append((start, end))
        self.stats["decode_steps"] += steps
        self.stats["row_steps"] += steps * rows

    def gpu_decode_seconds(self) -> float:
        """With ``timing``: GPU time of the decode bursts since the last call (synchronizes)."""
        return self._elapsed(self._events)

    def gpu_prefill_seconds(self) -> float:
        """With ``timing``: GPU time of the prefills since the last call (synchronizes)."""
        return self._elapsed(self._prefill_events)

    def _elapsed(self, events) -> float:
        torch.cuda.synchronize(self.device)
        total = sum(a.elapsed_time(b) for a, b in events) / 1e3
        events.clear()
        return total

    def release(self) -> None:
        """Free the KV cache and graphs (e.g. between RL rollouts, to give the memory to training)."""
        self.graphs.clear()
        self.prefill_graphs.clear()
        self.cache = self.state = None
        self.pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- prefill ------------------------------------------------------------------------------------
    def _prefill(self, groups: list[tuple[list[int], list[int], torch.Tensor | None]]) -> dict:
        """groups: (prompt tokens, slots, image tiles or None). Writes positions 0..len-2 into every slot
        of each group; returns {group index: hidden state [hidden] at position len-2} on the last
        pipeline stage (this stage's output, before the final norm), empty on the others."""
        index = [g for g, (p, _, _) in enumerate(groups) if len(p) > 1]
        work = [(groups[g][0][:-1], groups[g][1], groups[g][2]) for g in index]
        shape = self._small_shape(work)
        if shape is not None:
            hidden = self._prefill_small(work, shape)
        else:
            hidden = self._prefill_packed(work) if self.pack_prefill else self._prefill_padded(work)
        return {index[i]: h for i, h in hidden.items()}

    # small prefills: fixed shapes, one CUDA graph each
    def _small_shape(self, work) -> tuple[int, int, int] | None:
        """(rows, positions, slot writes) bucketed to powers of two when ``work`` is a small prefill of
        text prompts on a single-stage model whose cache holds the padded rows; else None."""
        if not work or self.par.pp > 1 or any(t is not None and t.shape[0] for _, _, t in work):
            return None
        rows = _pow2(len(work))
        positions = max(16, _pow2(max(len(p) for p, _, _ in work)))
        if rows * positions > self.small_prefill_tokens or positions > self.cache.capacity:
            return None
        return rows, positions, _pow2(sum(len(s) for _, s, _ in work))

    def _prefill_small(self, work, shape: tuple[int, int, int]) -> dict:
        """Right-padded rows of the bucketed shape through ``StageWeights.prefill_indexed``: the padding
        rows are written nowhere (their slot writes repeat a real row's last one), the padding
        positions write keys past each row's length, which decode overwrites before it reads them.
        With CUDA graphs the call is a replay (captured the first time the shape is seen); without,
        the same function runs eagerly."""
        rows, positions, writes = shape
        lengths = [len(p) for p, _, _ in work]
        host = torch.zeros(rows * positions + 2 * writes + rows, dtype=torch.long)
        tokens, flat, src, last = _small_views(shape, host)
        pairs = [(slot, r) for r, (_, slots, _) in enumerate(work) for slot in slots]
        pairs += [pairs[-1]] * (writes - len(pairs))
        for r, (p, _, _) in enumerate(work):
            tokens[r, :len(p)] = torch.tensor(p)
            last[r] = len(p) - 1
        flat.copy_(torch.tensor([a for a, _ in pairs]))
        src.copy_(torch.tensor([b for _, b in pairs]))
        out = self._timed_prefill(self._run_small, shape, host)
        self.stats["prefill_tokens"] += sum(lengths)
        self.stats["prefill_computed"] += rows * positions
        self.stats["prefill_calls"] += 1
        return {r: out[r] for r in range(len(work))}

    def _run_small(self, shape, host: torch.Tensor) -> torch.Tensor:
        """The hidden states [rows, hidden] (with graphs: the graph's static output, valid until the
        shape's next replay)."""
        if not self.cuda_graphs:
            return self._small_forward(shape, host.to(self.device))
        if shape in self.prefill_graphs:
            buf, out, g = self.prefill_graphs[shape]
            buf.copy_(host.pin_memory(), non_blocking=True)
            g.replay()
            return out
        # first sight of the shape: the capture's warm-up is the real prefill; the replay below
        # recomputes the same values into the graph's static output
        buf = host.to(self.device)
        g, out = self._capture(lambda: self._small_forward(shape, buf))
        self.prefill_graphs[shape] = (buf, out, g)
        g.replay()
        return out

    def _small_forward(self, shape, buf: torch.Tensor) -> torch.Tensor:
        """The hidden state at each row's last position, [rows, hidden]."""
        tokens, flat, src, last = _small_views(shape, buf)
        x = self.w.prefill_indexed(self.w.embed(tokens), 0, flat, src, None, self.cache, self.cos, self.sin)
        return x[torch.arange(shape[0], device=x.device), last]

    def _timed_prefill(self, fn, *args):
        timed = self.timing and self.device.type == "cuda"
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = fn(*args)
        if timed:
            end.record()
            self._prefill_events.append((start, end))
        return out

    # packed rows
    def _prefill_packed(self, work) -> dict:
        hidden, embeds = {}, {}
        for row in pack_prefill_rows([len(p) for p, _, _ in work], self.prefill_tokens):
            self._timed_prefill(self._prefill_packed_row, work, row, embeds, hidden)
        return hidden

    def _prefill_packed_row(self, work, row, embeds, hidden) -> None:
        packed = PackedRow.build([(start, n, work[i][1]) for i, start, n in row], self.device, self.prefill_tokens)
        if self.par.first:
            x = self._packed_embeddings(work, row, embeds)
        else:
            x = torch.empty(packed.tokens, self.w.hidden, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self.par.prev)
        x = self.w.prefill_packed(x, packed, self.cache, self.cos, self.sin)
        if not self.par.last:
            dist.send(x.contiguous(), dst=self.par.next)
        else:
            ends = [j for j, (i, start, n) in enumerate(row) if start + n == len(work[i][0])]
            if ends:
                h = x[packed.last[ends]]
                for r, j in enumerate(ends):
                    hidden[row[j][0]] = h[r]
        self.stats["prefill_tokens"] += packed.tokens
        self.stats["prefill_computed"] += packed.tokens
        self.stats["prefill_calls"] += 1

    def _packed_embeddings(self, work, row, embeds) -> torch.Tensor:
        """The row's input embeddings [T, hidden]. Prompts with images go through the multimodal
        model's splice whole (all of the row's new ones in one ViT call); their embeddings are kept in
        ``embeds`` while pieces of them remain for the next rows."""
        x = self.w.embed(torch.tensor([t for i, start, n in row for t in work[i][0][start:start + n]],
                                      device=self.device))
        if self.w.vlm is None:
            return x
        new = [i for i, start, _ in row if start == 0 and work[i][2] is not None and work[i][2].shape[0]]
        if new:
            ids = torch.zeros(len(new), max(len(work[i][0]) for i in new), dtype=torch.long)
            for r, i in enumerate(new):
                ids[r, :len(work[i][0])] = torch.tensor(work[i][0])
            pix = torch.cat([work[i][2] for i in new]).to(self.device)
            spliced = self.w.vlm._decoder_input(ids.to(self.device), None, pix)  # [L, m, hidden]
            for r, i in enumerate(new):
                embeds[i] = spliced[:len(work[i][0]), r]
        off = 0
        for i, start, n in row:
            if i in embeds:
                x[off:off + n] = embeds[i][start:start + n]
                if start + n == len(work[i][0]):
                    del embeds[i]
            off += n
        return x

    # right-padded rows
    def _prefill_padded(self, work) -> dict:
        """Rows of similar lengths (longest first), right-padded, in chunks of ``prefill_chunk``."""
        order = sorted(range(len(work)), key=lambda i: -len(work[i][0]))
        hidden, k = {}, 0
        while k < len(order):
            longest = len(work[order[k]][0])
            rows = max(1, self.prefill_tokens // max(1, min(longest, self.prefill_chunk)))
            batch = order[k:k + rows]
            k += len(batch)
            self._timed_prefill(self._prefill_rows, [work[i] for i in batch], batch, hidden)
        return hidden

    def _prefill_rows(self, batch, ids, hidden) -> None:
        n, longest = len(batch), len(batch[0][0])
        tokens = torch.zeros(n, longest, dtype=torch.long)
        for r, (p, _, _) in enumerate(batch):
            tokens[r, :len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        embeds = None
        if self.par.first:
            tiles = [t for _, _, t in batch if t is not None and t.shape[0]]
            if self.w.vlm is not None and tiles:
                pix = torch.cat(tiles).to(self.device)
                embeds = self.w.vlm._decoder_input(tokens, None, pix).transpose(0, 1)
            else:
                embeds = self.w.embed(tokens)
        slots = [s for _, s, _ in batch]
        lengths = [len(p) for p, _, _ in batch]
        for start in range(0, longest, self.prefill_chunk):
            end = min(longest, start + self.prefill_chunk)
            live = [r for r in range(n) if lengths[r] > start]  # sorted longest-first: a prefix of rows
            m = len(live)
            if self.par.first:
                x = embeds[:m, start:end].contiguous()
            else:
                x = torch.empty(m, end - start, self.w.hidden, dtype=self.dtype, device=self.device)
                dist.recv(x, src=self.par.prev)
            x = self.w.prefill(x, start, slots[:m], self.cache, self.cos, self.sin)
            if not self.par.last:
                dist.send(x.contiguous(), dst=self.par.next)
            else:
                for r in live:
                    if lengths[r] <= end:
                        hidden[ids[r]] = x[r, lengths[r] - 1 - start]
            self.stats["prefill_computed"] += m * (end - start)
            self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += sum(lengths)

    # -- the call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], samples_cfg: list[dict], *, ids, vocab_size: int,
                 close_ids: Sequence[int], stop_ids: Sequence[int], tables: TokenTables | None,
                 banned_ids: Sequence[int] = (), tiles: Sequence[torch.Tensor | None] | None = None,
                 on_finish=None) -> list[dict]:
        """Low-level call (``generate.generate_ids`` is the public one). ``samples_cfg[i]``: limit,
        limit_reason, budget, grace, temperature, top_p, top_k, seed (checked by the caller).
        Returns per sample a dict of tokens, logprobs, forced, finish, thinking."""
        n = len(prompts)
        if len(stop_ids) > ds.MAX_STOP_IDS or len(close_ids) > ds.MAX_CLOSE_IDS:
            raise GenerationError(f"at most {ds.MAX_STOP_IDS} stop tokens and {ds.MAX_CLOSE_IDS} forced close "
                                  f"tokens, got {len(stop_ids)} and {len(close_ids)}")
        capacity = max(len(p) + c["limit"] for p, c in zip(prompts, samples_cfg))
        max_new = max(c["limit"] for c in samples_cfg)
        mode = sampling_mode(samples_cfg)
        self.reserve(n, capacity, max_new, vocab_size, mode)
        st = self.state
        self._set_shared(ids, vocab_size, banned_ids, stop_ids, close_ids, tables)
        buckets = _buckets(st.slots)

        groups: dict = {}
        for i, p in enumerate(prompts):
            key = (tuple(p), None if tiles is None or tiles[i] is None else _tile_key(tiles[i]))
            groups.setdefault(key, []).append(i)
        # longest work first (the budgets and limits are known): the last rows to start are the short
        # ones, so the batch does not end with a few long samples running nearly alone
        waiting = deque(sorted(groups.values(), key=lambda g: -(len(prompts[g[0]]) + samples_cfg[g[0]]["limit"])))
        free = list(range(st.slots))
        heapq.heapify(free)
        slot_of: dict[int, int] = {}  # slot -> sample
        results: list = [None] * n
        # a sample's token limit bounds its decode steps: it has finished once it has been stepped
        # ``limit`` times since its admission (steps counted by ``clock``)
        clock, admitted_at = 0, {}
        queued = None  # the rows of a burst already launched behind the one being looked at

        def steps_left() -> int:
            return max(samples_cfg[i]["limit"] - (clock - admitted_at[i]) for i in slot_of.values())

        def launch() -> int:
            """One burst over the smallest bucket holding the occupied slots: its rows."""
            nonlocal clock
            rows = next(b for b in buckets if b > max(slot_of))
            steps = max(1, min(self.check_every, steps_left()))
            self._decode(rows, mode, steps)
            clock += steps
            return rows

        while waiting or slot_of:
            if queued is None:
                if self._should_admit(waiting, free, slot_of):
                    self._admit(waiting, free, slot_of, prompts, samples_cfg, tiles, ids)
                    for i in slot_of.values():
                        admitted_at.setdefault(i, clock)
                rows = launch()
            else:
                rows = queued
            queued = None
            active = self._active_flags(rows)
            if not waiting and steps_left() > 0:
                # nothing waits for a slot: queue the next burst now, so the device keeps stepping
                # while the host looks at this one (rows finished in it are idle for that burst)
                queued = launch()
            self._harvest(rows, slot_of, free, results, prompts, on_finish, active.result())
            if not waiting and slot_of:
                self._compact(slot_of, free, buckets)  # behind a queued burst: its moves are ordered after it
        return results

    def _active_flags(self, rows: int) -> "_HostCopy":
        """The rows' ``active`` flags as of the work queued so far, copied to the host without
        waiting for what is queued after."""
        return _HostCopy(self.state.active[:rows])

    def _should_admit(self, waiting, free, slot_of) -> bool:
        """Refill in batches: a prefill of a few rows costs nearly what one of many does (launches), so
        wait until 1/16 of the slots are free (or every waiting sample fits, or nothing runs)."""
        if not waiting or not free:
            return False
        if not slot_of:
            return True
        waiting_samples = sum(len(g) for g in waiting)
        return len(free) >= min(max(1, self.state.slots // 16), waiting_samples)

    def reserve(self, samples: int, capacity: int, max_new: int, vocab_size: int, mode: str = "greedy") -> None:
        """Size the cache and state for a workload and capture its graphs now (a call that fits runs
        without allocating or capturing). Every rank of the model calls it."""
        padded_vocab = self.w.output.shape[0] * self.w.tp if self.w.post_process else vocab_size
        padded_vocab = self._agree_vocab(padded_vocab)
        self._ensure(self._slots_for(samples, capacity), capacity, max_new, padded_vocab)
        self.state.active.zero_()
        if self.cuda_graphs:
            for b in _buckets(self.state.slots):
                self._graph(b, mode)

    def _agree_vocab(self, v: int) -> int:
        if self.par.pp > 1:  # non-last stages have no output layer: take the last stage's size
            t = torch.tensor([v], device=self.device)
            dist.broadcast(t, src=self.par.last_rank, group=self.par.pp_group)
            v = int(t)
        return v

    def _set_shared(self, ids, vocab_size, banned_ids, stop_ids, close_ids, tables) -> None:
        st = self.state
        ban = torch.zeros(st.vocab)
        ban[vocab_size:] = float("-inf")
        for b in banned_ids:
            ban[b] = float("-inf")
        st.ban.copy_(ban)
        stop = torch.full((ds.MAX_STOP_IDS,), -1, dtype=torch.long)
        stop[:len(stop_ids)] = torch.tensor(list(stop_ids), dtype=torch.long)
        st.stop_ids.copy_(stop)
        close = torch.zeros(ds.MAX_CLOSE_IDS, dtype=torch.long)
        close[:len(close_ids)] = torch.tensor(list(close_ids), dtype=torch.long)
        st.close_ids.copy_(close)
        st.close_len.fill_(len(close_ids))
        st.think_ids.copy_(torch.tensor([ids.think, ids.end_think]))
        tables = tables or TokenTables.empty(st.vocab)
        st.utf8.zero_()
        st.sentence_end.zero_()
        st.utf8[:len(tables.utf8)] = tables.utf8[:st.vocab].to(self.device)
        st.sentence_end[:len(tables.sentence_end)] = tables.sentence_end[:st.vocab].to(self.device)

    def _admit(self, waiting, free, slot_of, prompts, cfgs, tiles, ids) -> None:
        admitted, groups = [], []
        while waiting and free:
            group = waiting[0]
            take = group[:len(free)]
            rest = group[len(take):]
            if rest:
                waiting[0] = rest
            else:
                waiting.popleft()
            slots = [heapq.heappop(free) for _ in take]
            for s, i in zip(slots, take):
                slot_of[s] = i
                admitted.append((s, i))
            first = take[0]
            groups.append((list(prompts[first]), slots, None if tiles is None else tiles[first]))
        self._prefill(groups)
        st = self.state
        vals = {k: [] for k in ("token", "pos", "limit", "limit_reason", "key", "temperature", "top_p", "top_k",
                                "bstate", "budget", "grace", "force_idx")}
        for _, i in admitted:
            p, c = prompts[i], cfgs[i]
            state = _prompt_state(p, ids.think, ids.end_think)
            budget = -1 if c["budget"] is None else c["budget"]
            vals["token"].append(p[-1])
            vals["pos"].append(len(p) - 1)
            vals["limit"].append(c["limit"])
            vals["limit_reason"].append(c["limit_reason"])
            vals["key"].append(sample_key(c["seed"], c["sample"]))
            vals["temperature"].append(c["temperature"])
            vals["top_p"].append(c["top_p"])
            vals["top_k"].append(c["top_k"])
            vals["bstate"].append(state)
            vals["budget"].append(budget)
            vals["grace"].append(c["grace"])
            vals["force_idx"].append(0 if state == ds.THINKING and budget == 0 else -1)
        idx = torch.tensor([s for s, _ in admitted], device=self.device)
        for name, v in vals.items():
            t = getattr(st, name)
            t[idx] = torch.tensor(v, dtype=t.dtype).to(self.device)
        for name in ("gen", "finish", "bcount", "utf8_pending"):
            getattr(st, name)[idx] = 0
        st.active[idx] = True

    def _harvest(self, rows, slot_of, free, results, prompts, on_finish, active: torch.Tensor) -> None:
        """``active``: the rows' flags on the host after the burst being looked at. A finished row's
        record is read behind any burst queued since (it no longer changes: inactive rows are left
        alone by the step)."""
        st = self.state
        done = [s for s in slot_of if not bool(active[s])]
        if not done:
            return
        idx = torch.tensor(done, device=self.device)
        longest = int(st.gen[idx].max())
        gen = st.gen[idx].cpu().tolist()
        toks = st.out_token[idx, :longest].cpu()
        logp = st.out_logp[idx, :longest].float().cpu()
        forced = st.out_forced[idx, :longest].cpu()
        finish = st.finish[idx].cpu().tolist()
        thinking = st.bcount[idx].cpu().tolist()
        if self.par.pp > 1:  # the recorded tokens, log-probs and forced mask live on the last stage
            packed = torch.stack([toks.double(), logp.double(), forced.double()]).to(self.device)
            dist.broadcast(packed, src=self.par.last_rank, group=self.par.pp_group)
            packed = packed.cpu()
            toks, logp, forced = packed[0].long(), packed[1].float(), packed[2].bool()
        for r, s in enumerate(done):
            i = slot_of.pop(s)
            heapq.heappush(free, s)
            k = gen[r]
            results[i] = {"tokens": toks[r, :k].tolist(), "logprobs": logp[r, :k].tolist(),
                          "forced": forced[r, :k].tolist(), "finish": _REASONS[finish[r]], "thinking": thinking[r]}
            if on_finish is not None:
                on_finish(i, results[i])

    def _compact(self, slot_of, free, buckets) -> None:
        """Move the highest occupied slots into lower free ones when a smaller bucket would then do."""
        n = len(slot_of)
        target = next(b for b in buckets if b >= n)
        high = sorted(s for s in slot_of if s >= target)
        if not high:
            return
        low = sorted(s for s in free if s < target)[:len(high)]
        src = torch.tensor(high, device=self.device)
        dst = torch.tensor(low, device=self.device)
        self.cache.move(src, dst)
        self.state.move(src, dst)
        self.state.active[src] = False
        free_set = set(free) - set(low) | set(high)
        free[:] = list(free_set)
        heapq.heapify(free)
        for s, d in zip(high, low):
            slot_of[d] = slot_of.pop(s)


class _HostCopy:
    """A device tensor copied to pinned host memory behind the work queued so far; ``result()``
    waits for that copy only (CPU tensors: a plain copy)."""

    def __init__(self, t: torch.Tensor):
        if t.device.type != "cuda":
            self.host, self.event = t.clone(), None
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.host.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def _small_views(shape: tuple[int, int, int], buf: torch.Tensor):
    """A small prefill's inputs packed in one int64 buffer (one host-to-device copy): tokens
    [rows, positions], the slot writes' slots and source rows [writes] each, each row's last index [rows]."""
    rows, positions, writes = shape
    n = rows * positions
    return buf[:n].view(rows, positions), buf[n:n + writes], buf[n + writes:n + 2 * writes], buf[n + 2 * writes:]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def pack_prefill_rows(lengths: Sequence[int], capacity: int) -> list[list[tuple[int, int, int]]]:
    """Next-fit with splitting: the prompts (``lengths`` tokens each, in order) fill rows of ``capacity``
    tokens back to back; one that does not fit is cut at the row's end and continues at the head of
    the next row. Every row but the last is full, and only a row's first piece continues a prompt.
    Returns per row its pieces: (prompt index, start position, tokens)."""
    rows, row, room = [], [], capacity
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            take = min(n - start, room)
            row.append((i, start, take))
            start, room = start + take, room - take
            if room == 0:
                rows.append(row)
                row, room = [], capacity
    if row:
        rows.append(row)
    return rows


def _tile_key(t: torch.Tensor) -> str:
    """Images take part in the prefill-sharing key: equal tokens with other images are other prompts."""
    import hashlib

    if t.numel() == 0:
        return None  # a prompt without images
    return hashlib.sha1(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
