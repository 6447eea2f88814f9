"""`chain:` the links of a chain, where knots are tied, and what the links share."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorachain.config.base import check

BIASES = ("none", "lora_only")
# how a link starts (chain/init.py): PEFT's A random, B = 0 (gaussian, kaiming), or from the weight's
# SVD (pissa) or QR (olora), or from the SVD of the loss gradient (gradient, LoRA-GA)
INITS = ("gaussian", "kaiming", "pissa", "olora", "gradient")
MOVING_INITS = ("pissa", "olora", "gradient")  # start away from zero: need the full-precision weights


@dataclass
class LinkConfig:
    """One link of the chain: its LoRA rank/alpha and its share of the training budget.

    Give at most one of `steps`, `epochs`, `fraction`; with none, the link takes an equal part of
    what the other links leave.
    """

    rank: int = 8
    alpha: float = 16.0
    steps: int | None = None
    epochs: float | None = None
    fraction: float | None = None
    init: str | None = None  # this link's start (one of INITS); None: chain.init

    def __post_init__(self) -> None:
        check(self.rank > 0, f"chain.links: rank must be > 0, got {self.rank}")
        check(self.init in (None, *INITS), f"chain.links: init must be one of {INITS}, got {self.init!r}")
        check(self.alpha > 0, f"chain.links: alpha must be > 0, got {self.alpha}")
        shares = [s for s in (self.steps, self.epochs, self.fraction) if s is not None]
        check(len(shares) <= 1, "chain.links: give at most one of steps, epochs, fraction")
        check(all(s > 0 for s in shares), f"chain.links: a link's share must be > 0, got {shares}")


@dataclass
class KnotConfig:
    """Where knots are tied: `fixed` at the links' shares (the paper), `auto` on a loss plateau."""

    policy: str = "fixed"
    window: int = 20  # auto: steps without improvement of the smoothed loss before a knot
    min_delta: float = 0.01  # auto: relative improvement that counts
    smoothing: float = 0.9  # auto: EMA factor of the training loss
    min_link_steps: int = 10  # auto: no knot before a link has run this many steps

    def __post_init__(self) -> None:
        check(self.window > 0, f"chain.knot.window: expected > 0, got {self.window}")
        check(0 <= self.smoothing < 1, f"chain.knot.smoothing: expected [0, 1), got {self.smoothing}")
        check(self.min_link_steps >= 1, "chain.knot.min_link_steps: expected >= 1")


@dataclass
class ChainConfig:
    """The chain of LoRA links and what they share. One link is plain LoRA."""

    links: list[LinkConfig] = field(default_factory=lambda: [LinkConfig()])
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture
    dropout: float = 0.05
    bias: str = "none"  # none | lora_only (a bias on each LoRA, merged into the layer's bias)
    # how each link starts: gaussian (the paper, after Hu et al.) | kaiming (PEFT) | pissa | olora |
    # gradient (LoRA-GA); a link's own `init` overrides it
    init: str = "gaussian"
    init_batches: int = 4  # gradient: training batches the loss gradient is averaged over
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (rsLoRA)
    # DoRA links (weight-decomposed LoRA): knots stay exact, but the chain exports as a merged model
    use_dora: bool = False
    knot: KnotConfig = field(default_factory=KnotConfig)
    method: str = "lora"  # lora (a chain of LoRA) | full (full fine-tuning baseline, one link)

    def __post_init__(self) -> None:
        check(len(self.links) >= 1, "chain.links: expected at least one link")
        check(self.method in ("lora", "full"), f"chain.method: expected lora or full, got {self.method!r}")
        check(self.method == "lora" or len(self.links) == 1, "chain.links: full fine-tuning takes one link")
        check(0 <= self.dropout < 1, f"chain.dropout: expected [0, 1), got {self.dropout}")
        check(self.bias in BIASES, f"chain.bias: expected one of {BIASES}, got {self.bias!r}")
        check(self.init in INITS, f"chain.init: expected one of {INITS}, got {self.init!r}")
        check(self.init_batches >= 1, f"chain.init_batches: expected >= 1, got {self.init_batches}")
        check(
            not (self.use_dora and self.moving_inits()),
            f"chain.use_dora: DoRA links start from zero here; {(self.moving_inits() or [''])[0]} moves them",
        )

    def link_init(self, i: int) -> str:
        """How link `i` starts: its own `init`, else `chain.init`."""
        return self.links[i].init or self.init

    def moving_inits(self) -> list[str]:
        """The keys of links that start away from zero (they move the base, so need its weights)."""
        keys = [f"chain.links.{i}.init" for i, link in enumerate(self.links) if link.init in MOVING_INITS]
        return (["chain.init"] if self.init in MOVING_INITS else []) + keys
