"""Anatomical labelling of detected vertebra candidates: a PURE function (numpy in, records out).

The network proposes candidates (heatmap peaks) with a detection score and a probability vector over
levels. Naming them one by one ("argmax per peak") breaks in exactly the cases that matter: two peaks
voting for the same level, a missed vertebra shifting everything below it, a spurious peak between two
bodies, or a transitional spine (L6 / T13). Here the naming is a **minimum-cost monotone path**:

* candidates are sorted head to foot (along world superior, LPS +z);
* each candidate is either *dropped* (cost ``drop_bias + drop_score_weight * log(score / score_floor)``,
  so dropping a strong peak costs more) or *kept* with a level state (cost ``log(p_max / p(level))
  [+ transitional_cost for T13/L6]``; the level term is relative to the candidate's favourite level so
  a flat, uninformative level vector costs nothing);
* consecutive kept candidates must have strictly increasing anatomical rank (no duplicates, head-to-foot
  order); the step may skip at most ``max_skip`` *standard* levels (a missed detection) at
  ``skip_cost`` each. T13 / L6 are optional states: T12 -> L1 is a normal step, T12 -> T13 -> L1 too;
* a spacing prior scores the 3D distance between consecutive kept centroids against the expected
  distance for the number of anatomical steps (log-normal: ``(log(d / d_expected))^2 / 2 sd^2``), so a
  doubled gap prefers "one level missing" and a half gap prefers "one candidate is spurious". It is
  the scan's own prior (``spacing_scan_rel_sd``): a first pass under the population prior (wide: people
  differ in size) measures the scan's scale from its named steps, and the naming is redone with the
  expected spacings times that scale and a narrow width (neighbours in one spine differ little), so a
  doubled step is clearly a missed body whatever the size of the spine;
* a tilt prior (``tilt_weight``, 0 = off) scores the angle of that step to the superior axis beyond
  ``max_tilt_deg``, so a near-horizontal step (to a weak peak on a spinous process) is not a vertebral step;
* the first and last kept candidates may be any level, so any contiguous run of levels (partial field
  of view; no sacrum, no thoracic spine) is equally acceptable a priori — the level probabilities anchor
  the run.
* with a ``level_probe`` onto the level map (``caudal_check_weight``, on by default) the caudal end of the
  run is checked against the level map one repeated step further down: below the run's last level the
  map should name the next one (below L5: S1, which the level head learns from pseudo-points placed one
  step below L5). This brings in evidence no candidate carries: the sacrum has no heatmap peak, and a run
  that stops one body short (a weak true L5 dropped, every name one level low) ends where the map still
  says "L5". A probe outside the image costs nothing, so a run cut by the field of view is not charged.

The dynamic programme keeps one extra bit per state ("a transitional level was used"), so one pass gives
the best standard path *and* the best path with T13/L6. When they are within ``ambiguity_margin`` the
vertebrae whose names differ are flagged ``"transitional?"`` instead of silently shifting every label.
The best path's labels shifted by one level up/down (same kept candidates) are also scored; if either is
within the margin every vertebra is flagged ``"level_ambiguous"``. The same flag is raised on a *count
conflict*: a strong candidate (score >= ``conflict_score``) that the best path drops although it lies one
plausible vertebral step (0.6-1.5 x the run's median step) beyond the first or last named vertebra. The
detector then sees one more body than the level probabilities leave names for -- typically a lumbarised
S1 / L6 at the bottom or a T12 that the level head calls L1 at the top -- and the cheapest naming drops
one end and may have shifted every label; a radiologist must count (:func:`count_conflict`).
Confidence combines the detection score, the level probability and the posterior of the chosen path
against those alternatives.

After naming, :func:`complete_run` (also pure; the heatmap enters only through a ``probe`` callable)
reports what the path implies but no candidate carries: a standard level the path skipped (L1 -> L3) is
placed between its neighbours, and one level beyond each end of the run is added where the heatmap has
a weak body there (a T11 on the slope of T12's peak has no local maximum of its own, so it is never a
candidate). Optionally (``extend_inside_mm``) an end level is added even without heat when the repeated
step lies well inside the field of view (``"extrapolated_no_heat"``). All are flagged (``"interpolated"`` /
``"extrapolated"`` / ``"extrapolated_no_heat"``) so a reader knows they were inferred, not detected.

Complexity ``O(N^2 S^2)`` with N candidates (<= ~40) and S level states (~13): milliseconds in numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from data_prep.scan import TRANSITIONAL_IDS, VERSE_LEVELS, anatomical_rank, level_name, standard_neighbour
from stage1_localize.config import LabellingConfig

TRANSITIONAL_FLAG = "transitional?"
AMBIGUOUS_FLAG = "level_ambiguous"
INTERPOLATED_FLAG = "interpolated"
EXTRAPOLATED_FLAG = "extrapolated"
#: an end level placed by the repeated step alone (no heat there; ``LabellingConfig.extend_inside_mm``)
EXTRAPOLATED_NO_HEAT_FLAG = "extrapolated_no_heat"

#: Standard (non-transitional) VerSe levels, head to foot.
_STANDARD_LEVELS = tuple(sorted((v for v in VERSE_LEVELS if v not in TRANSITIONAL_IDS), key=anatomical_rank))


@dataclass
class Assignment:
    """One named candidate: ``index`` into the input arrays, VerSe ``label``, confidence and flags."""

    index: int
    label: int
    confidence: float
    flags: list[str] = field(default_factory=list)

    @property
    def level(self) -> str:
        return level_name(self.label)


@dataclass
class LabellingResult:
    """Assignments head to foot, the path cost and the costs of the alternatives that were compared."""

    assignments: list[Assignment]
    cost: float
    alternatives: dict[str, float] = field(default_factory=dict)
    #: input row of a dropped candidate that contradicts the count of the named run (see ``count_conflict``)
    conflict_index: int | None = None
    #: the scan's spacing relative to the population prior (``LabellingConfig.spacing_scan_rel_sd``);
    #: None when the population prior named the candidates (off, or fewer than three named)
    spacing_scale: float | None = None


@dataclass
class Completion:
    """A level the named run implies but no candidate carries (:func:`complete_run`).

    ``position_mm`` ``(3,)`` world LPS; ``score`` the heat found there (0 when none: an interior gap is
    then placed by interpolation alone); ``flag`` :data:`INTERPOLATED_FLAG`, :data:`EXTRAPOLATED_FLAG` or
    :data:`EXTRAPOLATED_NO_HEAT_FLAG`.
    """

    label: int
    position_mm: np.ndarray
    score: float
    flag: str

    @property
    def level(self) -> str:
        return level_name(self.label)


#: Flags of the vertebrae :func:`complete_run` adds (benchmarks count them).
COMPLETION_FLAGS = frozenset({INTERPOLATED_FLAG, EXTRAPOLATED_FLAG, EXTRAPOLATED_NO_HEAT_FLAG})


#: ``probe(world_mm (3,), radius_mm) -> (world_mm (3,), heat)``: the best detector position within
#: ``radius_mm`` of a world point and the heat there (heat 0 where the point is outside the image).
Probe = Callable[[np.ndarray, float], tuple[np.ndarray, float]]

#: ``level_probe(world_mm (3,)) -> (L,) log-probabilities`` over the labeller's ``levels`` at a world point
#: (the level map there), or None where the point is outside the image.
LevelProbe = Callable[[np.ndarray], "np.ndarray | None"]

#: ``fov_depth(world_mm (3,)) -> mm``: how far a world point lies inside the scan's field of view (distance
#: to the nearest face of the image volume; negative outside).
FovDepth = Callable[[np.ndarray], float]


# ---------------------------------------------------------------------------------------------------
# Prior tables over level states
# ---------------------------------------------------------------------------------------------------
def _standard_levels_between(ra: int, rb: int) -> list[int]:
    """Standard (non-transitional) levels with rank strictly between ``ra`` and ``rb``, head to foot."""
    return [v for v in _STANDARD_LEVELS if ra < anatomical_rank(v) < rb]


def _standard_between(ra: int, rb: int) -> int:
    """Number of standard levels with rank strictly between ``ra`` and ``rb``."""
    return len(_standard_levels_between(ra, rb))


def _step_spacing_mm(vid: int, cfg: LabellingConfig) -> float:
    """Expected centroid distance of the step that *arrives* at level ``vid``."""
    r = anatomical_rank(vid)
    if r <= anatomical_rank(7):  # cervical
        return cfg.spacing_thoracic_mm * 0.65
    if r <= anatomical_rank(28):  # thoracic incl. T13
        return cfg.spacing_thoracic_mm
    return cfg.spacing_lumbar_mm


def _state_tables(states: Sequence[int], cfg: LabellingConfig):
    """``allowed (S,S)``, ``skip (S,S)`` standard levels skipped, ``expected (S,S)`` mm for a -> b."""
    S = len(states)
    ranks = [anatomical_rank(v) for v in states]
    allowed = np.zeros((S, S), dtype=bool)
    skip = np.zeros((S, S), dtype=np.int64)
    expected = np.ones((S, S), dtype=np.float64)
    all_by_rank = sorted(VERSE_LEVELS, key=anatomical_rank)
    for a in range(S):
        for b in range(S):
            if ranks[b] <= ranks[a]:
                continue
            gap = _standard_between(ranks[a], ranks[b])
            if gap > cfg.max_skip:
                continue
            allowed[a, b] = True
            skip[a, b] = gap
            # expected distance: sum of step spacings over the levels walked through (transitional
            # levels in between are not walked unless they are the endpoint)
            walked = [v for v in all_by_rank if ranks[a] < anatomical_rank(v) <= ranks[b]
                      and (v not in TRANSITIONAL_IDS or v == states[b])]
            expected[a, b] = sum(_step_spacing_mm(v, cfg) for v in walked)
    return allowed, skip, expected


def _spacing_cost(dist_mm: np.ndarray | float, expected_mm: np.ndarray, cfg: LabellingConfig) -> np.ndarray:
    d = np.maximum(np.asarray(dist_mm, dtype=np.float64), 1e-3)
    return cfg.spacing_weight * np.log(d / expected_mm) ** 2 / (2.0 * cfg.spacing_rel_sd**2)


def _check_config(cfg: LabellingConfig) -> None:
    """``ValueError`` naming the field for prior widths that would divide by zero."""
    for name in ("spacing_rel_sd", "tilt_sd_deg"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"labelling.{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.spacing_scan_rel_sd is not None and not cfg.spacing_scan_rel_sd > 0:
        raise ValueError(f"labelling.spacing_scan_rel_sd must be > 0 or None, got {cfg.spacing_scan_rel_sd}")


def _tilt_cost(step_mm: np.ndarray, superior: np.ndarray, cfg: LabellingConfig) -> float:
    """Cost of the angle between a step between two named neighbours (``(3,)`` world mm, either sign) and
    the superior axis: ``tilt_weight * max(0, angle - max_tilt_deg)^2 / (2 tilt_sd_deg^2)``; 0 when off."""
    if cfg.tilt_weight <= 0.0:
        return 0.0
    d = float(np.linalg.norm(step_mm))
    if d < 1e-6:
        return 0.0
    cos = abs(float(np.dot(step_mm, superior))) / (d * float(np.linalg.norm(superior)))
    excess = max(0.0, float(np.degrees(np.arccos(min(1.0, cos)))) - cfg.max_tilt_deg)
    return cfg.tilt_weight * excess**2 / (2.0 * cfg.tilt_sd_deg**2)


def _transition_cost(fixed, step_mm: np.ndarray, expected_mm, superior: np.ndarray, cfg: LabellingConfig):
    """Cost of stepping between two kept candidates ``step_mm`` (``(3,)`` world mm) apart: the state-pair
    cost ``fixed`` (skip penalty) + the spacing prior + the tilt prior. ``fixed`` / ``expected_mm`` are the
    ``(S', S)`` tables in the dynamic programme, scalars for one fixed path (:func:`_path_cost`)."""
    d = float(np.linalg.norm(step_mm))
    return fixed + _spacing_cost(d, expected_mm, cfg) + _tilt_cost(step_mm, superior, cfg)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------
def assign_levels(
    positions_mm: np.ndarray,
    scores: np.ndarray,
    level_logprobs: np.ndarray,
    levels: Sequence[int],
    config: LabellingConfig | None = None,
    *,
    superior: Sequence[float] = (0.0, 0.0, 1.0),
    level_probe: LevelProbe | None = None,
) -> LabellingResult:
    """Name candidates with an anatomically consistent, ordered set of levels.

    Parameters
    ----------
    positions_mm: ``(N, 3)`` world LPS centroids of the candidates.
    scores: ``(N,)`` detection scores in (0, 1] (heatmap peak heights).
    level_logprobs: ``(N, L)`` log-probabilities over ``levels`` (the level head's vocabulary).
    levels: ``L`` VerSe ids (any order; these are the only names that can be assigned).
    config: costs (:class:`LabellingConfig`).
    superior: world direction pointing to the head (LPS +z by default).
    level_probe: the level map at any world point (:data:`LevelProbe`), for the caudal continuation check
        (``config.caudal_check_weight``; see :class:`_CaudalCheck`). None: no check.

    Returns a :class:`LabellingResult`; ``assignments`` are sorted head to foot and reference the input
    rows through ``Assignment.index``. Dropped candidates do not appear.
    """
    cfg = config or LabellingConfig()
    _check_config(cfg)
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    n = len(pos)
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    lp = np.asarray(level_logprobs, dtype=np.float64).reshape(n, len(levels))
    if sc.shape[0] != n:
        raise ValueError(f"got {n} positions, {sc.shape[0]} scores, logprobs {lp.shape} for {len(levels)} levels")
    if n == 0:
        return LabellingResult([], 0.0)
    probe = level_probe if cfg.caudal_check_weight > 0 else None
    first = _assign_once(pos, sc, lp, levels, cfg, superior, probe)
    scan_cfg = _scan_config(first, pos, levels, cfg)
    if scan_cfg is None:
        return first
    res = _assign_once(pos, sc, lp, levels, scan_cfg, superior, probe)
    res.spacing_scale = scan_cfg.spacing_lumbar_mm / cfg.spacing_lumbar_mm
    return res


def _scan_config(first: LabellingResult, pos: np.ndarray, levels: Sequence[int],
                 cfg: LabellingConfig) -> LabellingConfig | None:
    """The spacing prior of this scan (``LabellingConfig.spacing_scan_rel_sd``): expected spacings times the
    median ratio (observed / expected) over the steps of the population-prior path ``first``, with the
    narrower within-scan width; ``None`` when off or when ``first`` names fewer than three candidates."""
    if cfg.spacing_scan_rel_sd is None or len(first.assignments) < 3:
        return None
    named = first.assignments  # head to foot
    states = sorted({int(v) for v in levels}, key=anatomical_rank)  # every named label is one of these
    _, _, expected = _state_tables(states, cfg)
    ratios = [float(np.linalg.norm(pos[b.index] - pos[a.index])) / expected[states.index(a.label), states.index(b.label)]
              for a, b in zip(named[:-1], named[1:])]
    scale = float(np.median(ratios))
    return replace(cfg, spacing_thoracic_mm=cfg.spacing_thoracic_mm * scale,
                   spacing_lumbar_mm=cfg.spacing_lumbar_mm * scale,
                   spacing_rel_sd=cfg.spacing_scan_rel_sd, spacing_scan_rel_sd=None)


class _CaudalCheck:
    """Cost of ending the named run at candidate ``c`` in state ``s`` (its caudal end), after ``a``.

    The run's last step (``pos[c] - pos[a]``; straight down the superior axis by the lumbar spacing prior
    when ``c`` is alone, ``a < 0``) is repeated below ``c``, and the level map there (``level_probe``)
    should name the next standard level (L5 -> S1: the level head learns the sacrum from pseudo-points
    placed exactly so, ``Stage1Config.extrapolate_caudal``). Cost: ``caudal_check_weight * log(p_best /
    p_next)`` at that point (floored at ``min_prob``); 0 where the point lies outside the image or the
    next level is outside the vocabulary.

    Why: a level head that reads several mid-lumbar bodies one level off outvotes a correct L5; the
    cheapest naming then drops the real L5 (a weak peak above the sacrum) and calls L4 "L5". One step
    below that false L5 the level map still says L5, not S1 -- evidence the candidates alone never give.
    ``pos`` ``(N, 3)`` and the states are the dynamic programme's (head to foot, anatomical order).
    """

    def __init__(self, pos: np.ndarray, states: list[int], levels: Sequence[int], level_probe: LevelProbe,
                 cfg: LabellingConfig, superior: np.ndarray):
        self.pos, self.probe, self.cfg = pos, level_probe, cfg
        vocab = [int(v) for v in levels]
        nxt = [standard_neighbour(v, +1) for v in states]
        #: index into ``levels`` of each state's next standard level (-1: none in the vocabulary)
        self.next_index = [vocab.index(v) if v is not None and v in vocab else -1 for v in nxt]
        self.down = -superior / float(np.linalg.norm(superior)) * cfg.spacing_lumbar_mm
        self._seen: dict[tuple[int, int], np.ndarray | None] = {}

    def __call__(self, c: int, a: int, s: int) -> float:
        j = self.next_index[s]
        if j < 0:
            return 0.0
        key = (c, a if a >= 0 else -1)
        if key not in self._seen:
            step = self.pos[c] - self.pos[a] if a >= 0 else self.down
            lpq = self.probe(self.pos[c] + step)
            # floored and relative to the best level, as a candidate's node cost
            self._seen[key] = None if lpq is None else _relative_logprobs(
                np.asarray(lpq, dtype=np.float64).reshape(1, -1), self.cfg)[0]
        rel = self._seen[key]
        return 0.0 if rel is None else -self.cfg.caudal_check_weight * float(rel[j])


def _assign_once(pos: np.ndarray, scores: np.ndarray, lp: np.ndarray, levels: Sequence[int], cfg: LabellingConfig,
                 superior, level_probe: LevelProbe | None = None) -> LabellingResult:
    """One dynamic programme under the spacing prior of ``cfg`` (see :func:`assign_levels`)."""
    n = len(pos)
    sc = np.clip(scores, 0.01, 0.99)
    p_abs = np.exp(np.maximum(lp, np.log(cfg.min_prob)))
    lp = _relative_logprobs(lp, cfg)

    # states in anatomical order
    perm = np.argsort([anatomical_rank(v) for v in levels], kind="stable")
    states = [int(levels[i]) for i in perm]
    lp, p_abs = lp[:, perm], p_abs[:, perm]
    S = len(states)
    trans = np.array([v in TRANSITIONAL_IDS for v in states])

    # candidates head to foot
    sup = np.asarray(superior, dtype=np.float64)
    order = np.argsort(-(pos @ sup), kind="stable")
    pos, sc, lp, p_abs = pos[order], sc[order], lp[order], p_abs[order]

    node = -lp + cfg.transitional_cost * trans[None, :]  # (N, S)
    drop = _drop_cost(sc, cfg)  # (N,)
    drop_prefix = np.concatenate([[0.0], np.cumsum(drop)])  # sum of drop[0:c] = drop_prefix[c]
    allowed, skip, expected = _state_tables(states, cfg)
    step_fixed = np.where(allowed, cfg.skip_cost * skip, np.inf)  # (S, S)

    INF = np.inf
    best = np.full((n, S, 2), INF)
    back = np.full((n, S, 2, 3), -1, dtype=np.int64)  # (prev candidate, prev state, prev bit)
    tbit = trans.astype(np.int64)
    for c in range(n):
        # start a path at c (all earlier candidates dropped)
        for s in range(S):
            best[c, s, tbit[s]] = drop_prefix[c] + node[c, s]
        for a in range(c):
            tr = _transition_cost(step_fixed, pos[c] - pos[a], expected, sup, cfg)  # (S', S)
            between = drop_prefix[c] - drop_prefix[a + 1]
            for bit in (0, 1):
                prev = best[a, :, bit]
                if not np.any(np.isfinite(prev)):
                    continue
                tot = prev[:, None] + tr + between  # (S', S)
                arg = np.argmin(tot, axis=0)
                val = tot[arg, np.arange(S)] + node[c]
                for s in range(S):
                    nb = bit | tbit[s]
                    if val[s] < best[c, s, nb]:
                        best[c, s, nb] = val[s]
                        back[c, s, nb] = (a, arg[s], bit)
    tail = drop_prefix[n] - drop_prefix[1:]  # cost of dropping everything after c
    totals = best + tail[:, None, None]  # (N, S, 2)
    check = None if level_probe is None else _CaudalCheck(pos, states, levels, level_probe, cfg, sup)
    if check is not None:
        # the caudal-end term is added after the recursion: each end keeps the predecessor chosen without it
        for c, s, bit in zip(*np.nonzero(np.isfinite(totals))):
            totals[c, s, bit] += check(int(c), int(back[c, s, bit, 0]), int(s))

    def _trace(bit: int) -> tuple[float, list[tuple[int, int]]]:
        t = totals[:, :, bit]
        if not np.any(np.isfinite(t)):
            return INF, []
        c, s = np.unravel_index(int(np.argmin(t)), t.shape)
        cost = float(t[c, s])
        path, b = [], bit
        while c >= 0:
            path.append((int(c), int(s)))
            c, s, b = back[c, s, b]
        return cost, path[::-1]

    cost_std, path_std = _trace(0)
    cost_tr, path_tr = _trace(1)
    empty_cost = float(drop_prefix[n])
    candidates = [(cost_std, path_std, "standard"), (cost_tr, path_tr, "transitional"), (empty_cost, [], "empty")]
    cost, path, kind = min(candidates, key=lambda t: t[0])
    alternatives = {"standard": cost_std, "transitional": cost_tr, "none_kept": empty_cost}
    if not path:
        return LabellingResult([], cost, alternatives)

    # alternatives: same kept candidates, every level shifted by one standard step up / down
    alt_costs = []
    for shift in (-1, 1):
        shifted = _shift_states(path, states, shift)
        if shifted is not None:
            c_alt = _path_cost(shifted, node, drop, pos, allowed, step_fixed, expected, cfg, sup, check)
            alternatives[f"shift{shift:+d}"] = c_alt
            alt_costs.append(c_alt)
    other = cost_tr if kind == "standard" else cost_std
    alt_costs.append(other)
    posterior = 1.0 / (1.0 + sum(np.exp(-(c_alt - cost)) for c_alt in alt_costs if np.isfinite(c_alt)))

    ambiguous_shift = any(np.isfinite(c) and c - cost < cfg.ambiguity_margin
                          for k, c in alternatives.items() if k.startswith("shift"))
    other_path = path_tr if kind == "standard" else path_std
    differs: set[int] = set()
    if np.isfinite(other) and other - cost < cfg.ambiguity_margin:
        other_lab = {c: states[s] for c, s in other_path}
        differs = {c for c, s in path if other_lab.get(c) != states[s]}

    conflict = count_conflict(pos, sc, [c for c, _ in path], cfg)
    out = []
    for c, s in path:
        flags = []
        if trans[s] or c in differs:
            flags.append(TRANSITIONAL_FLAG)
        if ambiguous_shift or conflict is not None:
            flags.append(AMBIGUOUS_FLAG)
        conf = float(sc[c] * min(1.0, p_abs[c, s]) * posterior)
        out.append(Assignment(int(order[c]), states[s], conf, flags))
    return LabellingResult(out, cost, alternatives, None if conflict is None else int(order[conflict]))


def count_conflict(pos: np.ndarray, scores: np.ndarray, kept: Sequence[int], cfg: LabellingConfig) -> int | None:
    """Index of a dropped candidate that contradicts the count of the named run, else None.

    ``pos`` ``(N, 3)`` mm and ``scores`` ``(N,)`` are sorted head to foot; ``kept`` are the (sorted) indices
    the best path named. Beyond each end of the run, the nearest dropped candidate with score >=
    ``cfg.conflict_score`` is tested: a conflict when its distance to that end is within 0.6-1.5 x the median
    step between consecutive kept candidates (with one kept candidate: the lumbar spacing prior).
    """
    kept = sorted(int(c) for c in kept)
    if not kept or cfg.conflict_score >= 1.0:
        return None
    steps = [float(np.linalg.norm(pos[b] - pos[a])) for a, b in zip(kept[:-1], kept[1:])]
    step = float(np.median(steps)) if steps else cfg.spacing_lumbar_mm
    for end, cands in ((kept[0], range(kept[0] - 1, -1, -1)), (kept[-1], range(kept[-1] + 1, len(pos)))):
        for c in cands:  # nearest strong-enough dropped candidate beyond this end
            if scores[c] < cfg.conflict_score:
                continue
            d = float(np.linalg.norm(pos[c] - pos[end]))
            if 0.6 * step <= d <= 1.5 * step:
                return int(c)
            break
    return None


def _drop_cost(scores: np.ndarray, cfg: LabellingConfig) -> np.ndarray:
    """``drop_bias + drop_score_weight * log(score / score_floor)``: never below ``drop_bias``, higher
    for a strong peak. Keeping costs nothing for detection, so the keep/drop decision is driven by the
    anatomy (order, spacing, duplicates) and only tilted by the score; a weakly trained heatmap with
    low but clean peaks does not lose its vertebrae."""
    s = np.maximum(scores, cfg.score_floor)
    return cfg.drop_bias + cfg.drop_score_weight * np.log(s / cfg.score_floor)


def _relative_logprobs(lp: np.ndarray, cfg: LabellingConfig) -> np.ndarray:
    """Floor at ``min_prob`` and subtract each row's maximum: the level term costs 0 for the candidate's
    favourite level and ``log(p_best / p)`` otherwise. Detection evidence comes from the score alone, so
    an uninformative level vector (flat) costs nothing and a candidate is not dropped for it."""
    lp = np.maximum(lp, np.log(cfg.min_prob))
    return lp - lp.max(axis=1, keepdims=True)


def _shift_states(path: list[tuple[int, int]], states: list[int], shift: int) -> list[tuple[int, int]] | None:
    """Shift every kept label by one *standard* level (transitional states map like their neighbour)."""
    std_idx = [i for i, v in enumerate(states) if v not in TRANSITIONAL_IDS]
    out = []
    for c, s in path:
        if states[s] in TRANSITIONAL_IDS:
            return None
        k = std_idx.index(s) + shift
        if k < 0 or k >= len(std_idx):
            return None
        out.append((c, std_idx[k]))
    return out


def _path_cost(path, node, drop, pos, allowed, step_fixed, expected, cfg, superior, check=None) -> float:
    """Cost of a fixed path (kept candidates with states); ``inf`` if it breaks the order rules. ``check``:
    the caudal continuation term (:class:`_CaudalCheck`) of the path's last candidate, or None."""
    kept = {c for c, _ in path}
    total = float(sum(drop[c] for c in range(len(drop)) if c not in kept))
    for i, (c, s) in enumerate(path):
        total += float(node[c, s])
        if i:
            a, sa = path[i - 1]
            if not allowed[sa, s]:
                return float("inf")
            total += float(_transition_cost(step_fixed[sa, s], pos[c] - pos[a], expected[sa, s], superior, cfg))
    if check is not None and path:
        total += check(path[-1][0], path[-2][0] if len(path) > 1 else -1, path[-1][1])
    return total


def path_cost(
    positions_mm: np.ndarray,
    scores: np.ndarray,
    level_logprobs: np.ndarray,
    levels: Sequence[int],
    labels: dict[int, int],
    config: LabellingConfig | None = None,
    *,
    superior: Sequence[float] = (0.0, 0.0, 1.0),
    level_probe: LevelProbe | None = None,
) -> float:
    """Cost :func:`assign_levels` gives to a fixed naming ``labels`` ({input row: VerSe id}; others dropped),
    under the same spacing prior (with ``spacing_scan_rel_sd``: the scan's, from the same first pass).

    For tests and diagnostics: the optimum returned by :func:`assign_levels` is never above this (with
    ``level_probe``, up to the caudal check's approximation: each end keeps the predecessor the recursion
    chose without it).
    """
    cfg = config or LabellingConfig()
    _check_config(cfg)
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    raw_scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    raw_lp = np.asarray(level_logprobs, dtype=np.float64).reshape(len(pos), len(levels))
    probe = level_probe if cfg.caudal_check_weight > 0 else None
    if len(pos):
        cfg = _scan_config(_assign_once(pos, raw_scores, raw_lp, levels, cfg, superior, probe), pos, levels, cfg) or cfg
    sc = np.clip(raw_scores, 0.01, 0.99)
    lp = _relative_logprobs(raw_lp, cfg)
    perm = np.argsort([anatomical_rank(v) for v in levels], kind="stable")
    states = [int(levels[i]) for i in perm]
    lp = lp[:, perm]
    trans = np.array([v in TRANSITIONAL_IDS for v in states])
    order = np.argsort(-(pos @ np.asarray(superior, dtype=np.float64)), kind="stable")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    pos, sc, lp = pos[order], sc[order], lp[order]
    node = -lp + cfg.transitional_cost * trans[None, :]
    drop = _drop_cost(sc, cfg)
    allowed, skip, expected = _state_tables(states, cfg)
    step_fixed = np.where(allowed, cfg.skip_cost * skip, np.inf)
    path = sorted((int(inv[r]), states.index(int(v))) for r, v in labels.items())
    sup = np.asarray(superior, dtype=np.float64)
    check = None if probe is None else _CaudalCheck(pos, states, levels, probe, cfg, sup)
    return _path_cost(path, node, drop, pos, allowed, step_fixed, expected, cfg, sup, check)


def complete_run(
    positions_mm: np.ndarray,
    labels: Sequence[int],
    probe: Probe,
    levels: Sequence[int],
    config: LabellingConfig | None = None,
    fov_depth: FovDepth | None = None,
) -> list[Completion]:
    """Levels the named run implies but no candidate carries: a pure function of the run, ``probe`` and
    ``fov_depth``.

    ``positions_mm`` ``(M, 3)`` world LPS centroids of the named vertebrae, ``labels`` their ``M`` VerSe ids
    (any order). With ``config.fill_gaps``, every *standard* level the run skips (the labeller allows
    ``max_skip`` missing levels between two kept candidates, e.g. L1 -> L3) is placed on the straight line
    between its named neighbours, at equal steps, then moved to the detector's best position within
    ``fill_search_mm`` when the heat there reaches ``fill_min_heat``; flagged :data:`INTERPOLATED_FLAG`.
    With ``config.extend_ends``, up to ``extend_levels`` levels beyond each end of the run are added, one
    at a time (the last step repeated from the last level added) while the heat within ``fill_search_mm``
    of the next point reaches ``fill_min_heat``; flagged :data:`EXTRAPOLATED_FLAG`. A probed position
    closer than ``min_step_fraction`` x the local step
    to a named neighbour is the shoulder of that neighbour's peak, not another body: a gap then keeps the
    interpolated point, an end adds nothing -- unless ``config.extend_inside_mm`` is set and ``fov_depth``
    puts the repeated step at least that far inside the field of view: the level is then added at the
    repeated step itself (flag :data:`EXTRAPOLATED_NO_HEAT_FLAG`, score = the heat found). With
    ``extend_inside_mm`` and ``fov_depth``, an end level found *with* heat is also added only that far
    inside the field of view (closer to the edge, the body is cut and its centroid is not in view). Never
    a transitional level (T13 / L6: an anatomical claim the path did not make), never S1 or below (the
    detector is trained to treat the sacrum as background), never a level outside ``levels`` (the model's
    vocabulary). Returns completions head to foot."""
    cfg = config or LabellingConfig()
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    labs = [int(v) for v in labels]
    if len(labs) != len(pos):
        raise ValueError(f"got {len(pos)} positions and {len(labs)} labels")
    if int(cfg.extend_levels) < 0 or not 0.0 <= cfg.min_step_fraction <= 1.0:
        raise ValueError(f"labelling.extend_levels must be >= 0 and min_step_fraction in [0, 1]; got "
                         f"{cfg.extend_levels} and {cfg.min_step_fraction}")
    if cfg.extend_inside_mm is not None and cfg.extend_inside_mm < 0:
        raise ValueError(f"labelling.extend_inside_mm must be >= 0 or None; got {cfg.extend_inside_mm}")
    if not (cfg.fill_gaps or cfg.extend_ends) or len(labs) < 2:
        return []
    order = np.argsort([anatomical_rank(v) for v in labs], kind="stable")
    pos, labs = pos[order], [labs[i] for i in order]
    vocab = {int(v) for v in levels}
    sacrum = anatomical_rank(26)

    def usable(v: int | None) -> bool:
        return v is not None and v in vocab and v not in TRANSITIONAL_IDS and anatomical_rank(v) < sacrum

    def clear_of(where: np.ndarray, neighbours: Sequence[np.ndarray], step_mm: float) -> bool:
        return all(np.linalg.norm(where - q) >= cfg.min_step_fraction * step_mm for q in neighbours)

    def deep_enough(where: np.ndarray) -> bool:
        return cfg.extend_inside_mm is None or fov_depth is None or float(fov_depth(where)) >= cfg.extend_inside_mm

    def extend(end: int, inner: int, direction: int) -> list[Completion]:
        """Up to ``extend_levels`` completions beyond ``labs[end]``, nearest first."""
        added: list[Completion] = []
        label, here = labs[end], pos[end]
        n_steps = 1 + _standard_between(*sorted((anatomical_rank(labs[end]), anatomical_rank(labs[inner]))))
        step = (pos[end] - pos[inner]) / n_steps
        for _ in range(int(cfg.extend_levels)):
            level = standard_neighbour(label, direction)
            if not usable(level):
                break
            guess = here + step
            where, heat = probe(guess, cfg.fill_search_mm)
            where = np.asarray(where, dtype=np.float64).reshape(3)
            flag = EXTRAPOLATED_FLAG
            if heat >= cfg.fill_min_heat and clear_of(where, [here], float(np.linalg.norm(step))):
                if not deep_enough(where):  # a body cut by the field of view: its centroid is not in view
                    break
            else:
                if cfg.extend_inside_mm is None or fov_depth is None or not deep_enough(guess):
                    break
                where, flag = guess, EXTRAPOLATED_NO_HEAT_FLAG  # the body is there, the detector is blind
            added.append(Completion(int(level), where, float(heat), flag))
            step, label, here = where - here, int(level), where
        return added

    out: list[Completion] = []
    if cfg.extend_ends:
        out.extend(reversed(extend(0, 1, -1)))
    if cfg.fill_gaps:
        for a in range(len(labs) - 1):
            missing = _standard_levels_between(anatomical_rank(labs[a]), anatomical_rank(labs[a + 1]))
            step_mm = float(np.linalg.norm(pos[a + 1] - pos[a])) / (len(missing) + 1)
            for t, v in enumerate(missing, start=1):
                if not usable(v):
                    continue
                guess = pos[a] + (pos[a + 1] - pos[a]) * t / (len(missing) + 1)
                where, heat = probe(guess, cfg.fill_search_mm)
                where = np.asarray(where, dtype=np.float64).reshape(3)
                if heat < cfg.fill_min_heat or not clear_of(where, [pos[a], pos[a + 1]], step_mm):
                    where = guess
                out.append(Completion(int(v), where, float(heat), INTERPOLATED_FLAG))
    if cfg.extend_ends:
        out.extend(extend(len(labs) - 1, len(labs) - 2, +1))
    return out
