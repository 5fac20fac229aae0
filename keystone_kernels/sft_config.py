"""The settings of a fine-tuning run (:class:`SFTConfig`) and what it returns (:class:`TrainResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("keystone", "random", "lora", "full")
# From the learning-rate sweeps in README.md (SmolLM2-135M, 2-digit addition, 60-150 steps x 8); LoRA r=16:
# 3e-4 (acc 0.77, ppl x1.03, QA 0.35) over 1e-3 (acc 0.81, ppl x1.13, QA 0.05).
DEFAULT_LR = {"keystone": 1e-3, "random": 1e-3, "lora": 3e-4, "full": 2e-5}


@dataclass
class SFTConfig:
    """Training settings. ``lr=None`` takes :data:`DEFAULT_LR` of the mode."""

    mode: str = "keystone"
    steps: int = 150
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    frozen_dtype: str = "bfloat16"
    backend: str | None = "auto"
    lora_r: int = 16  # lora mode: rank on q, k, v, o, gate, up, down; alpha = 2 r, no dropout

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
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

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")
