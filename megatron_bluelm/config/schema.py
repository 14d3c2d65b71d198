"""Typed run configuration: one dataclass per concern, few fields, each documented.

A run is described by a YAML recipe (``examples/*.yaml``) whose top-level sections are the fields of
:class:`RunConfig`, plus dotted command-line overrides (``--parallel.tp 2``). Loading and checking
live in :mod:`megatron_bluelm.config.loader` and :mod:`megatron_bluelm.config.validate`.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_bluelm.config.data import DataConfig
from megatron_bluelm.config.vision import VisionConfig


@dataclass
class ModelConfig:
    """The decoder's shape. ``preset`` fills every field left unset (None); explicit values win."""

    preset: str = "tiny"  # a decoder preset (config/presets.py)
    num_layers: Optional[int] = None  # decoder layers
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # SwiGLU inner width
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None  # GQA key/value groups
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    make_vocab_size_divisible_by: int = 128  # the embedding is padded to a multiple of this (and TP)
    rotary_base: Optional[float] = None  # RoPE theta
    norm_eps: Optional[float] = None  # RMSNorm epsilon
    init_std: Optional[float] = None  # weight init standard deviation
    # auto: te with Transformer Engine on a GPU, else fused with Triton on a GPU, else torch (models/spec.py)
    backend: Literal["auto", "te", "fused", "torch"] = "auto"


@dataclass
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is what is left: world size / (tp x pp x cp)."""

    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size
    vpp: Optional[int] = None  # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    # context parallel size: must be 1 in this build (context parallelism needs Transformer Engine's
    # attention, which our layer specs do not use yet); kept so recipes and the layout maths name it
    cp: int = 1
    sequence_parallel: bool = False  # shard norms/dropout activations over TP (needs tp > 1)
    distributed_optimizer: bool = False  # ZeRO-1: optimizer state sharded over data parallel
    overlap_grad_reduce: bool = False  # all-reduce gradient buckets while backward runs
    overlap_param_gather: bool = False  # all-gather parameters during forward (needs distributed_optimizer)
    first_stage_layers: Optional[int] = None  # uneven pipeline split: layers on the first stage
    last_stage_layers: Optional[int] = None  # layers on the last stage; the rest split evenly
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU


@dataclass
class OptimizerConfig:
    """AdamW (megatron-core's optimizer)."""

    lr: float = 3.0e-4  # peak learning rate
    min_lr: float = 3.0e-5  # floor of the decay
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0  # global gradient-norm clip


@dataclass
class ScheduleConfig:
    """Learning-rate schedule in optimizer steps (megatron-core OptimizerParamScheduler)."""

    style: Literal["cosine", "wsd", "linear", "constant"] = "cosine"  # wsd: warmup-stable-decay
    warmup_steps: int = 10  # linear warm-up from 0 to optimizer.lr
    decay_steps: Optional[int] = None  # None: the rest of training after warm-up
    wsd_decay_steps: Optional[int] = None  # WSD: length of the final decay phase
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "exponential"  # WSD decay shape


@dataclass
class TrainingConfig:
    """Steps and batch sizes: global = micro x data-parallel size x micro-batches per step."""

    train_steps: int = 50  # optimizer steps
    micro_batch_size: int = 2  # sequences per forward pass per rank
    global_batch_size: int = 8  # sequences per optimizer step over all ranks
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    recompute: Literal["none", "selective", "full"] = "none"  # selective: the attention core; full: whole layers
    recompute_num_layers: int = 1  # full recompute: layers per recompute block
    # CUDA: weight-gradient GEMMs add into the fp32 main gradients (one GEMM, no separate bf16 gradient +
    # add pass per micro-batch), and so do the token embedding's rows (models/embedding.py); false, and on
    # the CPU: megatron-core's unfused path (training/model_setup.py)
    fused_wgrad_accumulation: bool = True
    eval_interval: int = 25  # 0 disables periodic evaluation
    eval_steps: int = 2  # validation batches per evaluation
    # Benchmark evaluation by generation every eval_interval (SFT; eval/periodic.py, docs/EVALUATION.md):
    # bundled names (arithmetic, word_problems, choice) or JSONL paths; accuracy per budget to metrics.jsonl
    eval_benchmarks: list[str] = field(default_factory=list)
    eval_budgets: list[Optional[int]] = field(default_factory=lambda: [0, None])  # 0: non-thinking; none: unlimited
    eval_limit: Optional[int] = 64  # first N items of each benchmark
    eval_max_new_tokens: int = 256  # response length with an unlimited budget
    eval_answer_tokens: int = 32  # budget N: tokens allowed after the think block
    eval_batch_size: int = 32  # items per generation call
    # A step whose gradients (or loss) are NaN/inf is never applied. stop: end the run with an error
    # (nothing of that step is saved; the last checkpoint stays). skip: drop the step and go on.
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10  # nan_policy skip: stop once more steps than this were skipped in a run
    # Samples the training set is built for (>= train_steps x global_batch_size): megatron-core shuffles
    # for this count, so runs that share it see one data order whatever their train_steps (docs/CHECKPOINTS.md)
    train_samples: Optional[int] = None


@dataclass
class LoggingConfig:
    """Step lines, metrics.jsonl, TensorBoard and wandb, all under output_dir."""

    log_interval: int = 5  # steps between step lines
    output_dir: str = "outputs/run"  # metrics.jsonl, TensorBoard and wandb files
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_bluelm"
    # offline keeps runs local: `wandb sync` uploads them later
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    peak_tflops: Optional[float] = None  # per-GPU bf16 peak for MFU; None: by device name


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory; None disables saving
    load: Optional[str] = None  # directory to resume from
    save_interval: int = 0  # steps; 0: only at the end and on preemption signals
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    async_save: bool = False  # write the shards in a background process while training goes on
    # Host memory a save copies the device state into (docs/CHECKPOINTS.md, "Host staging buffers"):
    # pinned: the run's own buffers, allocated once and reused by every save, page-locked on CUDA
    # (pageable on CPU); pageable: the same, never page-locked; per_save: megatron-core's copy into
    # new pinned blocks from PyTorch's caching host allocator at each save
    host_buffers: Literal["pinned", "pageable", "per_save"] = "pinned"
    # when the run's own buffers are allocated: start: in a background thread after the first training
    # step (the first save finds them ready); first_save: in the first save
    host_buffers_at: Literal["start", "first_save"] = "start"


@dataclass
class RLConfig:
    """GRPO (stages/rl.py). A step = rollouts for ``prompts_per_step`` prompts x ``group_size``
    samples, rewards, group advantages, then ``updates_per_step`` optimizer steps over them."""

    task: str = "arithmetic"  # arithmetic (built-in toy) | a JSONL of prompts (see docs/RL.md)
    prompts_per_step: int = 8  # over all data-parallel ranks
    group_size: int = 8  # samples per prompt
    max_new_tokens: int = 8  # response length cap
    temperature: float = 1.0  # rollout sampling
    top_k: int = 0  # rollout top-k (0: off); the training log-probs use the same distribution
    top_p: float = 1.0  # rollout nucleus sampling
    thinking_budget: Optional[int] = 0  # per prompt unless the record sets one; 0 = non-thinking
    bridge_text: Optional[str] = None  # forced after a budget-closed </think>; None: the SFT data's bridge
    updates_per_step: int = 1  # mini-batches per rollout batch (each an optimizer step)
    clip_low: float = 0.2  # PPO ratio clip below 1
    clip_high: float = 0.28  # > clip_low: the clip-higher option
    dual_clip: Optional[float] = 3.0  # bound on the loss of negative-advantage tokens (verl clip_ratio_c); None: off
    log_ratio_clamp: float = 20.0  # |log ratio| clamp before exp (policy ratio, KL, rollout weight)
    kl_clamp: float = 10.0  # upper clamp of the per-token k3 KL
    kl_coef: float = 0.0  # > 0 keeps a frozen reference model and adds beta * KL (k3)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    rollout_is: str = "tis"  # train-inference mismatch correction: tis (truncated IS) | mis (masked IS) | none
    rollout_is_cap: float = 2.0  # the IS weight's cap (tis) or mask threshold (mis)
    normalize_std: bool = True  # GRPO; false: Dr. GRPO (mean-centred only)
    advantage_std: str = "group"  # group (GRPO) | source: std over the step's samples of the same source
    filter_zero_variance: bool = True  # drop groups with equal rewards from the loss (false: keep, A = 0)
    dynamic_sampling_rounds: int = 0  # DAPO: extra rollout rounds refilling zero-variance groups (a cap)
    # per data source: {reward: weight}
    rewards: dict = field(default_factory=lambda: {"default": {"exact_match": 1.0}})
    # JSONL task: {source: share of the prompts}; empty: as in the file
    source_ratios: dict = field(default_factory=dict)
    reward_model: Optional[str] = None  # checkpoint of stages/reward_model.py, scoring the 'model' reward
    budget_buffer: int = 0  # length_penalty: ramp to -1 over the last N thinking tokens of the budget
    overlong_buffer: int = 0  # overlong: ramp to -1 over the last N tokens before max_new_tokens
    # held-out task (JSONL or arithmetic:N), scored greedily every training.eval_interval
    eval_task: Optional[str] = None
    eval_prompts: int = 64  # held-out prompts per evaluation (a JSONL: its first N records, each once)
    eval_samples: int = 0  # also N samples per held-out prompt at rl.temperature: heldout/sampled_accuracy
    preference_data: Optional[str] = None  # reward-model stage: JSONL of {prompt|messages, chosen, rejected} | toy
    preference_holdout: float = 0.1  # reward-model stage: share of the pairs held out for its accuracy
    warmup_sft_steps: int = 0  # supervised steps on the task's warm-up pairs before RL
    seed: int = 7  # prompt order and sampling


@dataclass
class RunConfig:
    """One run: a YAML recipe's top-level sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)  # multimodal runs only (preset: none = text)


def literal_choices(tp) -> Optional[tuple]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) type, else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def choices_of(cls, name: str) -> tuple:
    """Allowed values of the ``Literal`` field ``name`` of dataclass ``cls``: the one place they are written."""
    choices = literal_choices(typing.get_type_hints(cls)[name])
    if choices is None:
        raise KeyError(f"{cls.__name__}.{name} is not a Literal field")
    return choices
