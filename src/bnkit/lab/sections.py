"""What an experiment hands to the report: a `Section` (claim, figure, table, generated text)
and the helpers that turn per-seed numbers into "mean ± std (n=3)".

Every number in a report comes from the saved metrics through these helpers, so the text
is rebuilt identically by `bnkit report RUN_DIR`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

VERDICTS = ("holds", "does not hold", "inconclusive", "mixed", "not run", "measured")
SE_MULTIPLE = 2.0  # a difference decides a verdict when it exceeds 2 standard errors


@dataclass
class Table:
    """A small table of already formatted strings: headers (k,), rows (m, k)."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One experiment's part of the report.

    Attributes:
        name: CLI name of the experiment (also the PNG file stem).
        title: heading.
        claim: the claim under test, one sentence.
        headline: one line of this run's numbers, for the summary table.
        verdict: one of VERDICTS, decided from the numbers.
        paragraphs: text generated from the numbers.
        table: the numbers behind the figure.
        figure: a matplotlib Figure or None.
        config: the resolved experiment config (shown in the report).
        cells: (finished, planned) cell counts.
    """

    name: str
    title: str
    claim: str
    headline: str = ""
    verdict: str = "not run"
    paragraphs: list[str] = field(default_factory=list)
    table: Table | None = None
    figure: object = None
    config: dict = field(default_factory=dict)
    cells: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Spread:
    """Mean, sample std (0 for n=1), min, max and count of per-seed values."""

    mean: float
    std: float
    lo: float
    hi: float
    n: int


def spread(values) -> Spread | None:
    """Summarize finite values (None and NaN dropped); None when nothing is left.

    std is the sample standard deviation sqrt(sum (v - mean)^2 / (n - 1)), 0 for n = 1.

    Example:
        >>> spread([1.0, 3.0]).std
        1.4142135623730951
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    n, mean = len(vals), math.fsum(vals) / len(vals)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return Spread(mean, std, min(vals), max(vals), n)


def fmt(values, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """Format per-seed values as 'mean ± std (n=k)', or 'mean (n=1)'; '–' when empty.

    Example:
        >>> fmt([0.861, 0.864, 0.858], scale=100)
        '86.1 ± 0.3 (n=3)'
    """
    s = spread(values)
    if s is None:
        return "–"
    mean = f"{s.mean * scale:,.{digits}f}{unit}"
    if s.n == 1:
        return f"{mean} (n=1)"
    return f"{mean} ± {s.std * scale:,.{digits}f} (n={s.n})"


def mean(values, default: float = math.nan) -> float:
    """Mean of the finite values, or `default` when there are none."""
    s = spread(values)
    return default if s is None else s.mean


def finite(*values: float) -> bool:
    """True when every value is a finite number (a measured mean, not NaN or inf)."""
    return all(math.isfinite(v) for v in values)


def pct(value: float, digits: int = 1) -> str:
    """0.861 -> '86.1%'; NaN -> 'n/a'."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:.{digits}f}%"


def _difference(a, b) -> tuple[float, float, int, int] | None:
    """(mean(a) - mean(b), its standard error, n_a, n_b); b may be a fixed number (n_b 0,
    no error). None when a group has fewer than 2 finite values."""
    sa = spread(a)
    if isinstance(b, (int, float)):
        sb = Spread(float(b), 0.0, float(b), float(b), 0)
    else:
        sb = spread(b)
        if sb is not None and sb.n < 2:
            return None
    if sa is None or sb is None or sa.n < 2:
        return None
    se = math.sqrt(sa.std ** 2 / sa.n + (sb.std ** 2 / sb.n if sb.n else 0.0))
    return sa.mean - sb.mean, se, sa.n, sb.n


def compare(a, b, claim: str = "a > b") -> str:
    """Decide a claim about two groups of per-seed values from their seed-to-seed spread.

    The difference of the means, d = mean(a) - mean(b), has the standard error
    se = sqrt(s_a^2 / n_a + s_b^2 / n_b) (sample variances). The claim "a > b" holds when
    d > 2 se, does not hold when d < -2 se, and is inconclusive otherwise, or when either group
    has fewer than 2 finite values ("a < b" is the mirror image). `b` may also be a fixed
    number (a bound such as 1.0x), which has no spread of its own.

    Example:
        >>> compare([0.90, 0.91, 0.92], [0.80, 0.81, 0.79])
        'holds'
        >>> compare([0.90, 0.70, 0.85], [0.80, 0.81, 0.79])
        'inconclusive'
        >>> compare([1.30, 1.35, 1.32], 1.0)
        'holds'
    """
    if claim not in ("a > b", "a < b"):
        raise ValueError(f"claim must be 'a > b' or 'a < b', got {claim!r}")
    diff = _difference(a, b)
    if diff is None:
        return "inconclusive"
    d, se = diff[0] * (1 if claim == "a > b" else -1), diff[1]
    if d > SE_MULTIPLE * se:
        return "holds"
    return "does not hold" if d < -SE_MULTIPLE * se else "inconclusive"


def paired(a: list[dict], b: list[dict], value) -> list[float]:
    """Per-seed differences value(a) - value(b) over the seeds both groups finished, in seed
    order; `value` is a metric name or a function of a record.

    Use it where the same seed gives both sides the same initial weights and batches: the
    differences cancel what the seed does to both, and `compare(paired(...), 0.0)` decides
    on their spread.

    Example:
        >>> recs = lambda *v: [{"seed": s, "metrics": {"err": e}} for s, e in enumerate(v)]
        >>> [round(d, 2) for d in paired(recs(0.3, 0.5), recs(0.2, 0.45), "err")]
        [0.1, 0.05]
    """
    get = (lambda r: r["metrics"].get(value)) if isinstance(value, str) else value
    bs = {r["seed"]: get(r) for r in b}
    return [get(r) - bs[r["seed"]] for r in sorted(a, key=lambda r: r["seed"])
            if r["seed"] in bs and get(r) is not None and bs[r["seed"]] is not None]


def evidence(a, b, scale: float = 1.0, digits: int = 1, unit: str = "",
             is_paired: bool = False) -> str:
    """How `compare(a, b)` was decided, in words: 'difference +2.1 ± 0.4 points (2 standard
    errors 0.8, n=3 vs 3)', the ± being one standard error; or why nothing was decided.
    With is_paired, `a` holds per-seed differences (`paired`) and `b` is 0.

    Example:
        >>> evidence([0.90, 0.91, 0.92], [0.80, 0.81, 0.79], 100, unit=" points")
        'difference +11.0 ± 0.8 points (2 standard errors 1.6, n=3 vs 3)'
    """
    diff = _difference(a, b)
    if diff is None:
        return "fewer than 2 seeds on a side, so the spread is unknown and nothing is decided"
    d, se, na, nb = diff
    vs = (f"n={na} vs {nb}" if nb else f"{na} seeds paired" if is_paired
          else f"n={na} against the fixed value")
    return (f"difference {d * scale:+,.{digits}f} ± {se * scale:,.{digits}f}{unit} "
            f"(2 standard errors {SE_MULTIPLE * se * scale:,.{digits}f}, {vs})")


def combine(verdicts: list[str]) -> str:
    """One verdict from several decided checks: all 'holds' -> holds, all 'does not hold' ->
    does not hold, any 'inconclusive' with no contradiction -> inconclusive, else mixed."""
    kinds = set(verdicts)
    if not kinds:
        return "not run"
    if len(kinds) == 1:
        return kinds.pop()
    if kinds <= {"holds", "inconclusive"} or kinds <= {"does not hold", "inconclusive"}:
        return "inconclusive"
    return "mixed"


def by(records: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Group records by variant values: {(variant[k] for k in keys): [records]} in run order."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(tuple(rec["variant"][k] for k in keys), []).append(rec)
    return groups


def metric(records: list[dict], name: str) -> list:
    """The values of one metric across records (seeds)."""
    return [rec["metrics"].get(name) for rec in records]


def decide(diffs: list[float], claim: str, scale: float = 1.0, digits: int = 1,
           unit: str = "") -> tuple[str, str]:
    """(verdict, how) for per-seed paired differences a - b: `compare(diffs, 0.0, claim)` and
    `evidence` in words.

    Example:
        >>> decide([0.10, 0.12, 0.11], "a > b", 100, unit=" points")[0]
        'holds'
    """
    return (compare(diffs, 0.0, claim),
            evidence(diffs, 0.0, scale, digits, unit, is_paired=True))
