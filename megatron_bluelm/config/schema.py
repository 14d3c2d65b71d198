"""Typed run configuration: one dataclass per concern, few fields, each documented.

A run is described by a YAML recipe (``examples/*.yaml``) whose top-level sections are the fields of
:class:`RunConfig`, plus dotted command-line overrides (``--parallel.tp 2``). Loading and checking
live in :mod:`megatron_bluelm.config.loader` and :mod:`megatron_bluelm.config.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_bluelm.config.data import DataConfig
from megatron_bluelm.config.vision import VisionConfig


@dataclass
class ModelConfig:
    """The decoder's shape. ``preset`` fills every field left unset (None); explicit values win."""

    preset: str = "tiny"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None  # GQA key/value groups
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    make_vocab_size_divisible_by: int = 128  # the embedding is padded to a multiple of this (and TP)
    rotary_base: Optional[float] = None
    norm_eps: Optional[float] = None
    init_std: Optional[float] = None
    backend: str = "auto"  # auto | te | fused | torch (see models/spec.py)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size
    vpp: Optional[int] = None  # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    cp: int = 1  # context parallel size (needs Transformer Engine attention)
    sequence_parallel: bool = False  # shard norms/dropout activations over TP (needs tp > 1)
    distributed_optimizer: bool = False  # ZeRO-1: optimizer state sharded over data parallel
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Uneven pipeline split: layers on the first / last stage; the rest split evenly.
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo


@dataclass
class OptimizerConfig:
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule in optimizer steps (megatron-core OptimizerParamScheduler)."""

    style: str = "cosine"  # cosine | wsd | linear | constant
    warmup_steps: int = 10
    decay_steps: Optional[int] = None  # None: the rest of training after warm-up
    wsd_decay_steps: Optional[int] = None  # WSD: length of the final decay phase
    wsd_decay_style: str = "exponential"  # WSD decay shape: linear | cosine | exponential | minus_sqrt


@dataclass
class TrainingConfig:
    train_steps: int = 50
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    recompute: str = "none"  # none | selective (attention core) | full (whole layers)
    recompute_num_layers: int = 1  # full recompute: layers per recompute block
    eval_interval: int = 25  # 0 disables periodic evaluation
    eval_steps: int = 2
    exit_on_nan: bool = True


@dataclass
class LoggingConfig:
    log_interval: int = 5
    output_dir: str = "outputs/run"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_bluelm"
    wandb_mode: str = "offline"  # offline keeps runs local: `wandb sync` uploads them later
    peak_tflops: Optional[float] = None  # per-GPU bf16 peak for MFU; None: by device name


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory; None disables saving
    load: Optional[str] = None  # directory to resume from
    save_interval: int = 0  # steps; 0: only at the end and on preemption signals
    keep_last: int = 2


@dataclass
class RLConfig:
    """GRPO (stages/rl.py). A step = rollouts for ``prompts_per_step`` prompts x ``group_size``
    samples, rewards, group advantages, then ``updates_per_step`` optimizer steps over them."""

    task: str = "arithmetic"  # arithmetic (built-in toy) | a JSONL of prompts (see docs/RL.md)
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    thinking_budget: Optional[int] = 0  # per prompt unless the record sets one; 0 = non-thinking
    updates_per_step: int = 1  # mini-batches per rollout batch (each an optimizer step)
    clip_low: float = 0.2
    clip_high: float = 0.28  # > clip_low: the clip-higher option
    kl_coef: float = 0.0  # > 0 keeps a frozen reference model and adds beta * KL (k3)
    normalize_std: bool = True  # GRPO; false: Dr. GRPO (mean-centred only)
    filter_zero_variance: bool = True  # drop groups with equal rewards from the loss (false: keep, A = 0)
    rewards: dict = field(default_factory=lambda: {"default": {"exact_match": 1.0}})
    warmup_sft_steps: int = 0  # supervised steps on the task's warm-up pairs before RL
    seed: int = 7


@dataclass
class RunConfig:
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
