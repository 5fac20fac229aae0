"""The settings of a fine-tuning run (:class:`SFTConfig`) and what it returns (:class:`TrainResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

PAPER_MODES = ("paper", "paper-without-keystone", "paper-random")
MODES = ("keystone", "random", "lora", "full") + PAPER_MODES
# From the learning-rate sweeps in README.md (SmolLM2-135M, 2-digit addition, 60-150 steps x 8); LoRA r=16:
# 3e-4 (acc 0.77, ppl x1.03, QA 0.35) over 1e-3 (acc 0.81, ppl x1.13, QA 0.05). The paper modes take its
# train.py: lr 5e-5, a linear schedule after 3% warm-up, weight decay 0.01 (not on norms and biases).
DEFAULT_LR = {"keystone": 1e-3, "random": 1e-3, "lora": 3e-4, "full": 2e-5} | dict.fromkeys(PAPER_MODES, 5e-5)
_PAPER_DEFAULTS = {"warmup_ratio": 0.03, "weight_decay": 0.01, "schedule": "linear"}
_OUR_DEFAULTS = {"warmup_ratio": 0.1, "weight_decay": 0.0, "schedule": "cosine"}
SCHEDULES = ("cosine", "linear")


@dataclass
class SFTConfig:
    """Training settings. ``lr``, ``warmup_ratio``, ``weight_decay`` and ``schedule`` left None take the mode's
    defaults (:data:`DEFAULT_LR`; the paper modes the paper's recipe, the others warm-up 0.1, no weight
    decay, cosine)."""

    mode: str = "keystone"
    steps: int = 150
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = 1.0
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    frozen_dtype: str = "bfloat16"
    backend: str | None = "auto"
    lora_r: int = 16  # lora mode: rank on q, k, v, o, gate, up, down; alpha = 2 r, no dropout
    schedule: str | None = None
    # torch.compile the model (forward + backward, inductor) and, in the keystone modes, the optimizer's device
    # work (KeystoneAdamW(capturable=True, compile_step=True)): the same numbers, fewer host ops per step
    compile: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name, value in (_PAPER_DEFAULTS if self.mode in PAPER_MODES else _OUR_DEFAULTS).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("steps", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mode == "lora" and (int(self.lora_r) != self.lora_r or self.lora_r < 1):
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        if self.frozen_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"frozen_dtype must be bfloat16, float16 or float32, got {self.frozen_dtype!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step
    step_seconds: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    trainable_parameters: int = 0
    optimizer_state_bytes: int = 0
    resumed_from: int = 0
    skipped_steps: int = 0  # steps a capturable optimizer skipped for non-finite gradients

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")
