"""Paper claims as data, and a verdict rule that can come out either way.

A :class:`Claim` is fixed before a run: the paper's statement, the metric, the arm and what it is
compared with (another arm, paired by seed, or a threshold), the claimed direction and a margin in
the metric's units. :func:`judge` takes the per-seed values and returns a :class:`Verdict`:

* the estimate: the mean paired difference d_k = arm_k - baseline_k over seeds k (or arm_k - threshold);
* its two-sided 95% t-interval [lo, hi] (``scipy.stats.ttest_1samp(...).confidence_interval``);
* the outcome, decided by that interval and the margin m:

  ==============  ====================  ======================================
  direction       reproduced            contradicted
  ==============  ====================  ======================================
  ``greater``     lo > m                hi < m
  ``less``        hi < -m               lo > -m
  ``equivalent``  -m < lo and hi < m    lo > m or hi < -m (all of it outside)
  ==============  ====================  ======================================

  and **inconclusive** otherwise. For ``equivalent`` this is the two one-sided tests procedure (TOST),
  here at 2.5% per side because the interval is the 95% one. A claim of "greater" that is true only at
  the margin is called reproduced in at most 2.5% of runs.
* the effect the run could have detected with 80% power under the same rule, from the noncentral t
  distribution (``scipy.stats.nct``) at the observed standard error: for ``greater``/``less`` the
  distance beyond the margin, for ``equivalent`` the margin an exactly-zero effect would need. An
  inconclusive verdict quotes it: "this run could have detected ...".

With fewer than two paired seeds there is no interval, and the verdict is inconclusive; so is one whose
paired differences are all identical on fewer than five seeds (a tie, not yet a deterministic effect). A claim may
name ``requires``: claims of the same experiment that must be reproduced first (a precondition: e.g.
SGD must beat GD before "MSGD generalizes like SGD" can be judged); otherwise its verdict is
inconclusive and says which precondition failed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Direction = Literal["greater", "less", "equivalent"]
Outcome = Literal["reproduced", "contradicted", "inconclusive"]
DIRECTIONS = ("greater", "less", "equivalent")
CONFIDENCE = 0.95
POWER = 0.8
MIN_SEEDS_IDENTICAL = 5  # identical paired differences count as exact only from this many seeds


@dataclass(frozen=True)
class Claim:
    """One headline claim of a paper, stated before the run.

    ``arm`` and ``baseline`` are folder names of the experiment's arms (``baseline=None``: compare
    ``arm`` with ``threshold``). ``metric`` is a key of each run's ``final.json``; ``metric_label``
    says what it measures and in which unit. ``margin`` is in the metric's units (see :func:`judge`).
    ``paper_value`` is what the paper reported, with its scale (dataset, model, budget). ``extension``, when
    not empty, says why the claim is this lab's and not the paper's (a corrected method, a reading the paper
    does not report): the report judges it in a table of its own, so its verdict never reads as the paper
    being contradicted. ``quote`` is the paper's own words that the claim rests on, verbatim, with where they
    stand (``"abstract: ..."``, ``"Section 5: ..."``); every claim of the paper's own carries one, so a reader
    can check our ``statement`` (a paraphrase, fixed before the run) against the source.

    Example:
        >>> c = Claim("demo.sgd_beats_gd", "Wu et al. 2020", "Fig. 1", "SGD generalizes better than GD.", "test_acc",
        ...           arm="sgd", direction="greater", margin=0.0, paper_value="+2 points", baseline="gd")
        >>> c.describe()
        'test_acc(sgd) - test_acc(gd) > 0'
    """

    id: str
    paper: str
    where: str
    statement: str
    metric: str
    arm: str
    direction: Direction
    margin: float
    paper_value: str
    baseline: str | None = None
    threshold: float | None = None
    metric_label: str = ""
    requires: tuple[str, ...] = ()
    extension: str = ""
    quote: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"claim {self.id!r}: direction {self.direction!r} must be one of {DIRECTIONS}")
        if (self.baseline is None) == (self.threshold is None):
            raise ValueError(f"claim {self.id!r}: give exactly one of baseline (an arm) or threshold (a number)")
        if not self.margin >= 0:
            raise ValueError(f"claim {self.id!r}: margin {self.margin!r} must be >= 0 (in the metric's units)")

    @property
    def compared_with(self) -> str:
        return self.baseline if self.baseline is not None else f"{self.threshold:g}"

    def describe(self) -> str:
        """The hypothesis in symbols, e.g. ``test_acc(msgd_cov) - test_acc(sgd) in (-0.02, 0.02)``."""
        lhs = f"{self.metric}({self.arm}) - " + (f"{self.metric}({self.baseline})" if self.baseline is not None
                                                 else f"{self.threshold:g}")
        minus = f"-{self.margin:g}" if self.margin else "0"
        return {"greater": f"{lhs} > {self.margin:g}", "less": f"{lhs} < {minus}",
                "equivalent": f"|{lhs}| < {self.margin:g}"}[self.direction]


@dataclass
class Verdict:
    """What one run says about one claim. ``estimate`` and the interval are in the metric's units.

    Example:
        >>> Verdict("demo", "reproduced", 0.015, 0.003, 0.027, 3, 0.01, scale="quick").summary()
        'demo: reproduced (estimate 0.015, 95% CI [0.003, 0.027], n=3 paired seeds, quick scale)'
    """

    claim: str
    outcome: Outcome
    estimate: float
    ci_low: float
    ci_high: float
    n: int
    detectable: float  # the effect detectable at 80% power (see judge); nan with fewer than 2 seeds
    confidence: float = CONFIDENCE
    scale: str = ""
    seeds: list[int] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        ci = (f"[{self.ci_low:.4g}, {self.ci_high:.4g}]" if math.isfinite(self.ci_low) else "[no interval]")
        text = f"{self.claim}: {self.outcome} (estimate {self.estimate:.4g}, {100 * self.confidence:.0f}% CI {ci}, " \
               f"n={self.n} paired seeds, {self.scale or 'unknown'} scale)"
        return text + (f"; {self.note}" if self.note else "")


def quoted(claims: Iterable[Claim], quotes: Mapping[str, str]) -> list[Claim]:
    """Each claim with the paper's words of the longest key of ``quotes`` that its id starts with (an experiment
    keeps its quotes in one table, beside its claims). A claim no key covers keeps its own ``quote``.

    Example:
        >>> c = Claim("demo.a_beats_b.digits", "a paper", "Table 1", "A beats B.", "acc", arm="a", direction="greater",
        ...           margin=0.0, paper_value="", baseline="b")
        >>> quoted([c], {"demo": "abstract: ...", "demo.a_beats_b": 'Table 1: "A is better"'})[0].quote
        'Table 1: "A is better"'
    """
    out = []
    for c in claims:
        keys = [k for k in quotes if c.id == k or c.id.startswith(k + ".")]
        out.append(replace(c, quote=quotes[max(keys, key=len)]) if keys else c)
    return out


def paired_values(a: Mapping[int, float],
                  b: Mapping[int, float] | None) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """The seeds both arms have (sorted) and their values in that order; non-finite values are kept.

    Example:
        >>> paired_values({0: 1.0, 1: 2.0, 3: 4.0}, {1: 1.5, 3: 3.0, 5: 9.0})
        ([1, 3], array([2., 4.]), array([1.5, 3. ]))
    """
    seeds = sorted(set(a) & set(b)) if b is not None else sorted(a)
    va = np.array([a[s] for s in seeds], dtype=float)
    return seeds, va, (np.array([b[s] for s in seeds], dtype=float) if b is not None else None)


def _critical(df: int, confidence: float) -> float:
    from scipy import stats  # imported on use: scipy.stats costs over a second at import

    return float(stats.t.ppf(0.5 + confidence / 2, df))


def detectable_effect(n: int, sd: float, direction: Direction, confidence: float = CONFIDENCE,
                      power: float = POWER) -> float:
    """The effect this rule detects with probability ``power`` at ``n`` seeds and paired sd ``sd``.

    ``greater``/``less``: the distance delta beyond the margin with P(interval clears the margin) = power,
    P = nct.sf(t_c, n-1, delta/se) + nct.cdf(-t_c, n-1, delta/se). ``equivalent``: the margin an exactly
    zero effect needs, from the TOST power bound 2 nct.sf(t_c, n-1, m/se) - 1 = power.

    Example:
        >>> from scipy import stats
        >>> d = detectable_effect(10, 1.0, "greater")
        >>> se, tc = 1.0 / 10 ** 0.5, stats.t.ppf(0.975, 9)          # the rule's power at that effect: 80%
        >>> round(float(stats.nct.sf(tc, 9, d / se) + stats.nct.cdf(-tc, 9, d / se)), 3)
        0.8
    """
    if n < 2 or not math.isfinite(sd):
        return math.nan
    se = sd / math.sqrt(n)
    return 0.0 if se == 0 else _noncentrality(n, direction, confidence, power) * se


@functools.cache
def _noncentrality(n: int, direction: str, confidence: float, power: float) -> float:
    """The noncentrality (effect / standard error) at which the rule reaches ``power`` with ``n`` seeds."""
    from scipy import optimize, stats

    df, tc = n - 1, _critical(n - 1, confidence)

    def tail(p: float) -> float:  # scipy's nct can return nan for a vanishing tail
        return float(np.nan_to_num(p))

    if direction == "equivalent":
        target = lambda ncp: tail(stats.nct.sf(tc, df, ncp)) - (1 + power) / 2  # noqa: E731
    else:
        target = lambda ncp: tail(stats.nct.sf(tc, df, ncp)) + tail(stats.nct.cdf(-tc, df, ncp)) - power  # noqa: E731
    hi = 2.0 * (tc + 3.0)
    while target(hi) < 0:  # widen the bracket (few seeds need a large noncentrality)
        hi *= 2
        if hi > 1e4:
            return math.inf
    return float(optimize.brentq(target, 0.0, hi))


def judge(claim: Claim, arm: Mapping[int, float], baseline: Mapping[int, float] | None = None, *,
          scale: str = "", confidence: float = CONFIDENCE) -> Verdict:
    """The verdict on ``claim`` from per-seed values ``{seed: value}`` of its arm (and baseline, paired by seed).

    Seeds present in only one arm are left out; a non-finite value (a diverged run) makes the verdict
    inconclusive and says so, rather than silently dropping the seed.

    Example:
        >>> claim = Claim("demo", "a paper", "Table 1", "A beats B.", "acc", arm="a", direction="greater", margin=0.0,
        ...               paper_value="", baseline="b")
        >>> v = judge(claim, {0: 0.91, 1: 0.93, 2: 0.92}, {0: 0.90, 1: 0.91, 2: 0.905})
        >>> v.outcome, round(v.estimate, 4), v.n
        ('reproduced', 0.015, 3)
        >>> from scipy import stats                            # the interval is the paired t-interval
        >>> ci = stats.ttest_1samp([0.01, 0.02, 0.015], 0.0).confidence_interval(0.95)
        >>> bool(abs(v.ci_low - ci.low) < 1e-9 and abs(v.ci_high - ci.high) < 1e-9)
        True
        >>> judge(claim, {0: 0.80, 1: 0.81, 2: 0.79}, {0: 0.90, 1: 0.91, 2: 0.905}).outcome
        'contradicted'
        >>> judge(claim, {0: 0.91, 1: 0.89, 2: 0.92}, {0: 0.90, 1: 0.91, 2: 0.905}).outcome
        'inconclusive'
    """
    if (baseline is None) != (claim.baseline is None):
        wanted = "pass the baseline arm values" if claim.baseline is not None else "no baseline values expected"
        raise ValueError(f"claim {claim.id!r} compares with {claim.compared_with}: {wanted}")
    seeds, a, b = paired_values(arm, baseline)
    diffs = a - b if b is not None else a - float(claim.threshold)
    n = len(diffs)
    nan = math.nan
    if n == 0:
        return Verdict(claim.id, "inconclusive", nan, nan, nan, 0, nan, confidence, scale, seeds,
                       "no paired seeds (the arms have no seed in common)")
    if not np.all(np.isfinite(diffs)):
        bad = [s for s, d in zip(seeds, diffs) if not math.isfinite(d)]
        return Verdict(claim.id, "inconclusive", nan, nan, nan, n, nan, confidence, scale, seeds,
                       f"non-finite values at seeds {bad} (a diverged run, or a metric undefined there)")
    estimate = float(diffs.mean())
    if n < 2:
        return Verdict(claim.id, "inconclusive", estimate, nan, nan, n, nan, confidence, scale, seeds,
                       "one seed: no confidence interval; run more seeds")
    sd = float(diffs.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(estimate)):
        if n < MIN_SEEDS_IDENTICAL:  # a discrete metric (an accuracy) can tie on a few seeds by chance
            return Verdict(claim.id, "inconclusive", estimate, nan, nan, n, nan, confidence, scale, seeds,
                           f"all {n} paired differences are identical: too few seeds to tell a deterministic "
                           f"effect from a tie (need {MIN_SEEDS_IDENTICAL})")
        sd = 0.0
        lo = hi = estimate  # every seed agrees (a deterministic problem): the interval collapses
    else:
        from scipy import stats

        interval = stats.ttest_1samp(diffs, 0.0).confidence_interval(confidence)
        lo, hi = float(interval.low), float(interval.high)
    m = claim.margin
    if claim.direction == "greater":
        outcome = "reproduced" if lo > m else "contradicted" if hi < m else "inconclusive"
    elif claim.direction == "less":
        outcome = "reproduced" if hi < -m else "contradicted" if lo > -m else "inconclusive"
    else:
        outcome = ("reproduced" if -m < lo and hi < m else
                   "contradicted" if lo > m or hi < -m else "inconclusive")
    detectable = detectable_effect(n, sd, claim.direction, confidence)
    note = ""
    if outcome == "inconclusive":
        if claim.direction == "equivalent":
            note = (f"the interval straddles the margin ±{m:g}; this run could have confirmed equivalence only "
                    f"within ±{detectable:.3g} (80% power)")
        else:
            sign = "+" if claim.direction == "greater" else "-"
            note = (f"the interval straddles the margin {sign if m else ''}{m:g}; this run could have detected an "
                    f"effect of {sign}{m + detectable:.3g} (80% power)")
    return Verdict(claim.id, outcome, estimate, lo, hi, n, detectable, confidence, scale, seeds, note)


def with_precondition(verdict: Verdict, failed: Sequence[str]) -> Verdict:
    """The verdict made inconclusive because the claims in ``failed`` were not reproduced in this run.

    Example:
        >>> v = Verdict("b", "reproduced", 0.1, 0.05, 0.15, 3, 0.02, 0.95, "quick", [0, 1, 2], "")
        >>> with_precondition(v, ["a"]).outcome
        'inconclusive'
        >>> v.note
        'precondition not met in this run: a not reproduced, so this run cannot show the effect'
    """
    if not failed:
        return verdict
    verdict.outcome = "inconclusive"
    verdict.note = (f"precondition not met in this run: {', '.join(failed)} not reproduced, so this run cannot "
                    "show the effect; " + verdict.note).rstrip("; ")
    return verdict


def judge_all(claims: Iterable[Claim], values: Mapping[str, Mapping[int, float]], *, scale: str = "") -> list[Verdict]:
    """Judge claims in order from ``{arm: {seed: value}}`` per metric (``values[f"{arm}:{metric}"]``),
    applying each claim's ``requires``. Claims whose arms have no results are skipped.

    Example:
        >>> a = Claim("a", "p", "Fig. 1", "A beats B.", "acc", arm="A", direction="greater", margin=0.0,
        ...           paper_value="", baseline="B")
        >>> b = Claim("b", "p", "Fig. 2", "C beats B, given a.", "acc", arm="C", direction="greater", margin=0.0,
        ...           paper_value="", baseline="B", requires=("a",))
        >>> values = {"A:acc": {0: 0.80, 1: 0.81, 2: 0.79}, "B:acc": {0: 0.90, 1: 0.91, 2: 0.905},
        ...           "C:acc": {0: 0.95, 1: 0.97, 2: 0.955}}
        >>> [(v.claim, v.outcome) for v in judge_all([a, b], values)]      # b alone would be reproduced
        [('a', 'contradicted'), ('b', 'inconclusive')]
    """
    out: dict[str, Verdict] = {}
    for c in claims:
        a = values.get(f"{c.arm}:{c.metric}")
        b = values.get(f"{c.baseline}:{c.metric}") if c.baseline is not None else None
        if a is None or (c.baseline is not None and b is None):
            continue
        v = judge(c, a, b, scale=scale)
        failed = [r for r in c.requires if r not in out or out[r].outcome != "reproduced"]
        out[c.id] = with_precondition(v, failed)
    return list(out.values())
