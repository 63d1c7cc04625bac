"""Byzantine-robust aggregation settings (`spec.aggregator.robust`) and the checks they need.

Pure pydantic and arithmetic: the operator validates jobs with it, the aggregator reads the same
model from its ticket. The rules themselves live in `fedtune_trainer.strategies.robust`.

Rules (each over the parties' deltas, update − previous global, replacing the weighted mean;
the job's strategy — FedAvg, FedAdam, … — then steps on the result):
- `mean`: the sample-weighted mean (the default; with `normBound` alone, Sun et al. 2019);
- `median`: coordinate-wise median (Yin et al. 2018);
- `trimmedMean`: coordinate-wise mean after dropping the ⌊trimFraction·n⌋ largest and smallest values
  (Yin et al. 2018);
- `krum`: the one update closest to its n − f − 2 nearest neighbours (Blanchard et al. 2017);
- `multiKrum`: the mean of the `multiKrumSelect` best-scored updates (Blanchard et al. 2017).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from fedtune.api.base import ApiModel

RobustRule = Literal["mean", "median", "trimmedMean", "krum", "multiKrum"]
KRUM_RULES = ("krum", "multiKrum")
COORDINATE_RULES = ("median", "trimmedMean")
DEFAULT_TRIM_FRACTION = 0.25
DEFAULT_BYZANTINE = 1


def krum_minimum(byzantine: int) -> int:
    """The fewest updates Krum's guarantee holds for with `byzantine` faulty parties: n > 2f + 2."""
    return 2 * byzantine + 3


def trimmed_count(trim_fraction: float, n: int) -> int:
    """Values dropped at each end of every coordinate: ⌊trimFraction·n⌋ (rounding noise forgiven)."""
    return math.floor(trim_fraction * n + 1e-9)


class RobustSpec(ApiModel):
    """Byzantine-robust aggregation: a rule replacing the weighted mean, and optional norm bounding."""

    rule: RobustRule = Field(
        "mean",
        description="mean (sample-weighted, the default), median or trimmedMean (coordinate-wise, Yin et al. "
        "2018), krum or multiKrum (Blanchard et al. 2017). Robust rules weigh parties equally: sample counts are "
        "what each party reports, so an attacker could claim any.",
    )
    trim_fraction: float | None = Field(
        None,
        gt=0,
        lt=0.5,
        description="trimmedMean: the fraction of a round's updates dropped at each end of every coordinate "
        "(rounded down); at least the fraction of parties you assume faulty. Default 0.25.",
    )
    byzantine: int | None = Field(
        None,
        ge=0,
        description="krum, multiKrum: f, the parties assumed faulty (default 1). Krum needs more than 2f + 2 "
        "updates a round.",
    )
    multi_krum_select: int | None = Field(
        None,
        ge=1,
        description="multiKrum: m, how many best-scored updates are averaged; default and at most n - f of the "
        "round's n updates.",
    )
    norm_bound: float | None = Field(
        None,
        gt=0,
        description="Clip each party's delta (update - previous global, all tensors together) to this L2 norm "
        "before the rule (Sun et al. 2019). Works with every rule.",
    )

    @model_validator(mode="after")
    def _fields_of_the_rule(self) -> RobustSpec:
        unused = []
        if self.trim_fraction is not None and self.rule != "trimmedMean":
            unused.append("trimFraction applies to rule trimmedMean only")
        if self.byzantine is not None and self.rule not in KRUM_RULES:
            unused.append("byzantine applies to rules krum and multiKrum only")
        if self.multi_krum_select is not None and self.rule != "multiKrum":
            unused.append("multiKrumSelect applies to rule multiKrum only")
        if unused:
            raise ValueError(f"{'; '.join(unused)} (rule is {self.rule}): remove it or change the rule")
        return self

    @property
    def trim(self) -> float:
        """trimFraction, or its default."""
        return DEFAULT_TRIM_FRACTION if self.trim_fraction is None else self.trim_fraction

    @property
    def f(self) -> int:
        """byzantine, or its default."""
        return DEFAULT_BYZANTINE if self.byzantine is None else self.byzantine

    def count_problems(self, fewest: int, most: int) -> list[str]:
        """Why the rule cannot aggregate a round of `fewest` to `most` updates as promised, each with its fix.

        The spec is checked with minParties and the number of parties; the aggregator checks each
        round's own count (fewest = most = n) and fails the round with the same words.
        """
        out = []
        f = self.f
        if self.rule in KRUM_RULES and fewest < krum_minimum(f):
            out.append(
                f"{self.rule} with byzantine {f} needs more than 2*{f}+2 = {2 * f + 2} updates a round, and a "
                f"round may have {fewest}: raise minParties (with as many parties) to at least {krum_minimum(f)}, "
                "lower byzantine, or use rule median or trimmedMean"
            )
        if self.rule == "multiKrum" and self.multi_krum_select is not None and self.multi_krum_select > most - f:
            out.append(
                f"multiKrumSelect ({self.multi_krum_select}) is more than n - byzantine = {most - f} of the "
                f"{most} updates a round may have: lower it to at most {max(most - f, 1)}"
            )
        if self.rule == "trimmedMean" and trimmed_count(self.trim, fewest) == 0:
            out.append(
                f"trimmedMean with trimFraction {self.trim} trims nothing of {fewest} updates "
                f"(floor({self.trim}*{fewest}) = 0): raise trimFraction to at least {1 / fewest:.3g} "
                "(below 0.5), raise minParties, or use rule median"
            )
        return out

    def lora_mode_problem(self, lora_mode: str) -> str | None:
        """Why the rule cannot run with `lora_mode`, with the fix; None when it can."""
        if lora_mode == "exact" and self.rule in COORDINATE_RULES:
            return (
                f"rule {self.rule} with loraMode exact is not supported: coordinate-wise rules would need every "
                "party's dense B·A product per module; use loraMode average, or rule krum, multiKrum or mean "
                "(normBound works with both modes)"
            )
        return None
