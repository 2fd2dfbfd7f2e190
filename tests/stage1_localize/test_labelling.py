"""Hand-made candidate sets for the pure anatomical labeller."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_prep.scan import anatomical_rank, level_id
from stage1_localize.config import DEFAULT_LEVELS, LabellingConfig
from stage1_localize.labelling import AMBIGUOUS_FLAG, TRANSITIONAL_FLAG, assign_levels, path_cost

LEVELS = list(DEFAULT_LEVELS)


def _probs(true_id: int | None, p_true: float = 0.7, p_nb: float = 0.1) -> np.ndarray:
    """Level log-probabilities peaked at ``true_id`` (neighbours in the vocabulary get ``p_nb``)."""
    p = np.full(len(LEVELS), 1e-3)
    if true_id is None:
        p[:] = 1.0
    else:
        order = sorted(range(len(LEVELS)), key=lambda i: anatomical_rank(LEVELS[i]))
        pos = order.index(LEVELS.index(true_id))
        p[order[pos]] = p_true
        for d in (-1, 1):
            if 0 <= pos + d < len(order):
                p[order[pos + d]] = p_nb
    return np.log(p / p.sum())


def _column(names, spacing=35.0, z0=0.0, score=0.9):
    ids = [level_id(n) for n in names]
    pos = np.array([[1.0, 30.0 + 2.0 * i, z0 - spacing * i] for i in range(len(ids))])
    scores = np.full(len(ids), score)
    lps = np.stack([_probs(v) for v in ids])
    return ids, pos, scores, lps


def _labels(res):
    return [a.level for a in res.assignments]


def test_clean_sequence_in_order_without_flags():
    names = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    ids, pos, sc, lp = _column(names)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ids))  # input order must not matter
    res = assign_levels(pos[perm], sc[perm], lp[perm], LEVELS, LabellingConfig())
    assert _labels(res) == names
    assert [perm[a.index] for a in res.assignments] == list(range(len(ids)))
    assert all(a.flags == [] for a in res.assignments)
    assert all(0.3 < a.confidence <= 1.0 for a in res.assignments)
    # the optimum is never worse than the ground-truth naming
    truth = {int(np.where(perm == i)[0][0]): v for i, v in enumerate(ids)}
    assert res.cost <= path_cost(pos[perm], sc[perm], lp[perm], LEVELS, truth) + 1e-9


def test_missing_level_keeps_names_below_the_gap():
    names = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    ids, pos, sc, lp = _column(names)
    keep = [i for i, n in enumerate(names) if n != "L3"]
    res = assign_levels(pos[keep], sc[keep], lp[keep], LEVELS)
    assert _labels(res) == ["T12", "L1", "L2", "L4", "L5", "S1"]


def test_missing_level_with_uninformative_probs_uses_the_gap():
    # Level head only sure about the top (T12); geometry (a doubled gap) must place the skip.
    names = ["T12", "L1", "L2", "L3", "L4"]
    ids, pos, sc, lp = _column(names)
    flat = _probs(None)
    lp = np.stack([lp[0]] + [flat] * 4)
    keep = [0, 1, 3, 4]  # L2 missing
    res = assign_levels(pos[keep], sc[keep], lp[keep], LEVELS)
    assert _labels(res) == ["T12", "L1", "L3", "L4"]


def test_spurious_candidate_is_dropped():
    names = ["L1", "L2", "L3", "L4", "L5", "S1"]
    ids, pos, sc, lp = _column(names)
    extra = (pos[1] + pos[2]) / 2 + np.array([0.0, 5.0, 0.0])  # between L2 and L3 (a disc)
    pos2 = np.vstack([pos, extra])
    sc2 = np.append(sc, 0.4)
    lp2 = np.vstack([lp, _probs(None)])
    res = assign_levels(pos2, sc2, lp2, LEVELS)
    assert _labels(res) == names
    assert len(pos2) - 1 not in [a.index for a in res.assignments]


@pytest.mark.parametrize("names", [["L2", "L3", "L4", "L5"], ["T10", "T11", "T12", "L1", "L2"]])
def test_partial_field_of_view(names):
    ids, pos, sc, lp = _column(names, z0=100.0)
    res = assign_levels(pos, sc, lp, LEVELS)
    assert _labels(res) == names
    assert all(TRANSITIONAL_FLAG not in a.flags for a in res.assignments)


def test_l6_is_named_and_flagged_not_silently_shifted():
    # Six free lumbar bodies: the 6th votes mostly "L5-ish" but the sacrum is unmistakable below it.
    names = ["T12", "L1", "L2", "L3", "L4", "L5", "L6", "S1"]
    ids, pos, sc, lp = _column(names)
    p = np.full(len(LEVELS), 1e-3)
    p[LEVELS.index(24)], p[LEVELS.index(25)], p[LEVELS.index(26)] = 0.45, 0.3, 0.1
    lp[6] = np.log(p / p.sum())
    res = assign_levels(pos, sc, lp, LEVELS)
    labels = _labels(res)
    assert labels[:6] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert labels[-1] == "S1"
    flagged = [a.level for a in res.assignments if TRANSITIONAL_FLAG in a.flags]
    assert flagged, "a transitional spine must be flagged"
    assert "L6" in labels or "L5" in flagged


def test_ambiguous_shift_is_flagged():
    # Four evenly spaced bodies, level head uninformative: any contiguous naming fits equally well.
    names = ["L1", "L2", "L3", "L4"]
    ids, pos, sc, lp = _column(names)
    flat = np.stack([_probs(None)] * 4)
    res = assign_levels(pos, sc, flat, LEVELS)
    assert len(res.assignments) == 4
    assert all(AMBIGUOUS_FLAG in a.flags for a in res.assignments)
    ranks = [LEVELS.index(a.label) for a in res.assignments]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4
    # ... whereas a confident level head is not ambiguous
    _, _, _, lp = _column(names)
    res2 = assign_levels(pos, sc, lp, LEVELS)
    assert all(AMBIGUOUS_FLAG not in a.flags for a in res2.assignments)


def test_no_duplicates_even_when_two_peaks_vote_the_same_level():
    names = ["L2", "L3", "L4"]
    ids, pos, sc, lp = _column(names)
    lp[1] = _probs(level_id("L2"))  # L3 candidate also says L2
    res = assign_levels(pos, sc, lp, LEVELS)
    labels = _labels(res)
    assert len(labels) == len(set(labels))
    assert labels == ["L2", "L3", "L4"]


def test_empty_and_bad_shapes():
    res = assign_levels(np.zeros((0, 3)), np.zeros(0), np.zeros((0, len(LEVELS))), LEVELS)
    assert res.assignments == []
    with pytest.raises(ValueError):
        assign_levels(np.zeros((2, 3)), np.ones(3), np.zeros((2, len(LEVELS))), LEVELS)


def test_count_conflict_flags_one_body_more_than_names():
    """Six evenly spaced strong bodies whose level head reads L1, L1, L2, L3, L4, L5 (a real case: a
    lumbarised S1 at the bottom lets the head count from the sacrum). The cheapest naming drops one end;
    it must not do so silently."""
    names = ["L1", "L2", "L3", "L4", "L5", "S1"]
    ids, pos, sc, lp = _column(names, spacing=33.0, score=0.7)
    lp = np.stack([_probs(v, p_true=0.9, p_nb=0.05) for v in [20, 20, 21, 22, 23, 24]])
    res = assign_levels(pos, sc, lp, LEVELS)
    assert len(res.assignments) == 5
    assert res.conflict_index == 0  # the strong top body was dropped
    assert all(AMBIGUOUS_FLAG in a.flags for a in res.assignments)
    # a weak dropped peak (below conflict_score) is no conflict ...
    sc_weak = sc.copy()
    sc_weak[0] = 0.2
    res_weak = assign_levels(pos, sc_weak, lp, LEVELS)
    assert res_weak.conflict_index is None
    assert all(AMBIGUOUS_FLAG not in a.flags for a in res_weak.assignments)
    # ... nor is a strong one far beyond the run (2.5 steps: not the next vertebra)
    pos_far = pos.copy()
    pos_far[0, 2] += 1.5 * 33.0
    assert assign_levels(pos_far, sc, lp, LEVELS).conflict_index is None
    # ... and conflict_score 1.0 switches the check off
    assert assign_levels(pos, sc, lp, LEVELS, LabellingConfig(conflict_score=1.0)).conflict_index is None


def test_count_conflict_pure_function_on_hand_made_run():
    from stage1_localize.labelling import count_conflict
    pos = np.array([[0.0, 0.0, -30.0 * i] for i in range(5)])
    sc = np.array([0.9, 0.9, 0.9, 0.9, 0.5])
    cfg = LabellingConfig()
    assert count_conflict(pos, sc, [0, 1, 2, 3], cfg) == 4   # bottom body dropped, one step below
    assert count_conflict(pos, sc, [0, 1, 2, 3, 4], cfg) is None
    assert count_conflict(pos, sc, [1, 2, 3, 4], cfg) == 0   # top
    assert count_conflict(pos, sc, [], cfg) is None


# ----- completing the named run: skipped levels and one level beyond each end (pure, probe stand-ins) -----
from stage1_localize.labelling import EXTRAPOLATED_FLAG, INTERPOLATED_FLAG, complete_run  # noqa: E402

FILL = LabellingConfig(fill_gaps=True, extend_ends=True, fill_min_heat=0.1, fill_search_mm=10.0)


def _no_heat(point, radius_mm):
    return np.asarray(point, dtype=float), 0.0


def _heat_at(spots: dict[tuple, float]):
    """Probe over hand-placed heat spots {(x, y, z): heat}: the strongest spot within the radius."""
    def probe(point, radius_mm):
        best, where = 0.0, np.asarray(point, dtype=float)
        for xyz, h in spots.items():
            if np.linalg.norm(np.asarray(xyz) - point) <= radius_mm and h > best:
                best, where = h, np.asarray(xyz, dtype=float)
        return where, best
    return probe


def test_gap_without_heat_is_filled_at_the_midpoint():
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 4.0, -72.0]])
    out = complete_run(pos, [level_id("L1"), level_id("L3")], _no_heat, LEVELS, FILL)
    assert [(c.level, c.flag) for c in out] == [("L2", INTERPOLATED_FLAG)]
    np.testing.assert_allclose(out[0].position_mm, [0.0, 2.0, -36.0])
    assert out[0].score == 0.0


def test_gap_moves_to_the_heat_nearby_but_not_onto_a_neighbours_shoulder():
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -72.0]])
    ids = [level_id("L1"), level_id("L3")]
    out = complete_run(pos, ids, _heat_at({(0.0, 3.0, -40.0): 0.3}), LEVELS, FILL)
    np.testing.assert_allclose(out[0].position_mm, [0.0, 3.0, -40.0])
    assert out[0].score == pytest.approx(0.3)
    # a spot 19 mm from L1 (< 0.7 x the 36-mm step) is L1's shoulder: keep the midpoint
    out = complete_run(pos, ids, _heat_at({(0.0, 0.0, -19.0): 0.5}), LEVELS, FILL)
    np.testing.assert_allclose(out[0].position_mm, [0.0, 0.0, -36.0])


def test_ends_extend_one_level_only_where_the_heat_supports_it():
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0], [0.0, 0.0, -64.0]])
    ids = [level_id("T12"), level_id("L1"), level_id("L2")]  # given out of order on purpose
    perm = [2, 0, 1]
    spots = {(0.0, 1.0, 31.0): 0.15, (0.0, 0.0, -99.0): 0.6}
    out = complete_run(pos[perm], [ids[i] for i in perm], _heat_at(spots), LEVELS, FILL)
    assert [(c.level, c.flag) for c in out] == [("T11", EXTRAPOLATED_FLAG), ("L3", EXTRAPOLATED_FLAG)]
    np.testing.assert_allclose(out[0].position_mm, [0.0, 1.0, 31.0])
    np.testing.assert_allclose(out[1].position_mm, [0.0, 0.0, -99.0])
    # below the heat threshold, or only a neighbour's shoulder: nothing
    assert complete_run(pos, ids, _heat_at({(0.0, 0.0, 31.0): 0.09}), LEVELS, FILL) == []
    assert complete_run(pos, ids, _heat_at({(0.0, 0.0, 15.0): 0.9}), LEVELS, FILL) == []


def test_ends_extend_several_levels_one_step_at_a_time():
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0]])
    ids = [level_id("T12"), level_id("L1")]
    two = dataclasses.replace(FILL, fill_gaps=False, extend_levels=2)
    # T11 one step above T12 (moved 9 mm forward); T10 one *T11-based* step above it: the second step repeats
    # the first one actually taken (0, 9, 30) -> guess (0, 18, 60), 2 mm from the spot at (0, 20, 60); the
    # run's own step (0, 0, 30) would guess (0, 9, 60), 11 mm away, outside the 10-mm search
    spots = {(0.0, 9.0, 30.0): 0.3, (0.0, 20.0, 60.0): 0.2, (0.0, 0.0, -60.0): 0.5, (0.0, 0.0, -90.0): 0.5}
    out = complete_run(pos, ids, _heat_at(spots), LEVELS, two)
    assert [c.level for c in out] == ["T10", "T11", "L2", "L3"]  # head to foot
    np.testing.assert_allclose(out[0].position_mm, [0.0, 20.0, 60.0])
    assert all(c.flag == EXTRAPOLATED_FLAG for c in out)
    # one level (the default) stops after the first; a chain stops at the first level without heat
    assert [c.level for c in complete_run(pos, ids, _heat_at(spots), LEVELS,
                                          dataclasses.replace(two, extend_levels=1))] == ["T11", "L2"]
    no_t11 = {k: v for k, v in spots.items() if k != (0.0, 9.0, 30.0)}
    assert [c.level for c in complete_run(pos, ids, _heat_at(no_t11), LEVELS, two)] == ["L2", "L3"]
    assert complete_run(pos, ids, _heat_at(spots), LEVELS, dataclasses.replace(two, extend_levels=0)) == []


def test_min_step_fraction_decides_what_is_a_neighbours_shoulder():
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0]])
    ids = [level_id("T12"), level_id("L1")]
    spot = _heat_at({(0.0, 0.0, 20.0): 0.5})  # 20 mm above T12 = 0.67 x the 30-mm step
    cfg = dataclasses.replace(FILL, fill_gaps=False, min_step_fraction=0.6)
    assert [c.level for c in complete_run(pos, ids, spot, LEVELS, cfg)] == ["T11"]
    assert complete_run(pos, ids, spot, LEVELS, dataclasses.replace(cfg, min_step_fraction=0.7)) == []
    assert complete_run(pos, ids, spot, LEVELS, dataclasses.replace(FILL, fill_gaps=False)) == []  # default 0.7
    for bad in (dict(min_step_fraction=-0.1), dict(min_step_fraction=1.5), dict(extend_levels=-1)):
        with pytest.raises(ValueError, match="extend_levels must be >= 0"):
            complete_run(pos, ids, spot, LEVELS, dataclasses.replace(cfg, **bad))



def test_end_without_heat_is_added_only_well_inside_the_field_of_view():
    """``extend_inside_mm``: the spine does not stop between two visible bodies; with no heat (or only a
    neighbour's shoulder) the end level goes at the repeated step itself, if that lies deep enough inside
    the field of view (a hand-made box: top face at z = +50 mm, bottom face at z = -200 mm)."""
    from stage1_localize.labelling import EXTRAPOLATED_NO_HEAT_FLAG

    pos = np.array([[0.0, 0.0, 0.0], [0.0, 6.0, -30.0]])
    ids = [level_id("T12"), level_id("L1")]

    def fov_depth(p):
        return float(min(50.0 - p[2], p[2] + 200.0, 100.0))

    cfg = dataclasses.replace(FILL, fill_gaps=False, extend_inside_mm=15.0)
    out = complete_run(pos, ids, _no_heat, LEVELS, cfg, fov_depth=fov_depth)
    assert [(c.level, c.flag) for c in out] == [("T11", EXTRAPOLATED_NO_HEAT_FLAG), ("L2", EXTRAPOLATED_NO_HEAT_FLAG)]
    np.testing.assert_allclose(out[0].position_mm, [0.0, -6.0, 30.0])  # the run's step repeated upwards
    np.testing.assert_allclose(out[1].position_mm, [0.0, 12.0, -60.0])
    assert out[0].score == 0.0
    # T11 at z = 30 is 20 mm inside: not with a 25-mm requirement; L2 (140 mm inside) still is
    assert [c.level for c in complete_run(pos, ids, _no_heat, LEVELS, dataclasses.replace(cfg, extend_inside_mm=25.0),
                                          fov_depth=fov_depth)] == ["L2"]
    # a neighbour's shoulder only (a spot 8 mm from the guess but 22.6 mm from T12, < 0.8 x the 30.6-mm
    # step): the repeated step, not the shoulder
    shoulder = dataclasses.replace(cfg, min_step_fraction=0.8)
    out = complete_run(pos, ids, _heat_at({(0.0, -5.0, 22.0): 0.9}), LEVELS, shoulder, fov_depth=fov_depth)
    np.testing.assert_allclose(out[0].position_mm, [0.0, -6.0, 30.0])
    assert out[0].flag == EXTRAPOLATED_NO_HEAT_FLAG and out[0].score == pytest.approx(0.9)
    # heat there: the ordinary extrapolation wins (moved to the heat, ordinary flag)
    out = complete_run(pos, ids, _heat_at({(0.0, -4.0, 33.0): 0.2}), LEVELS, cfg, fov_depth=fov_depth)
    assert (out[0].flag, list(out[0].position_mm)) == (EXTRAPOLATED_FLAG, [0.0, -4.0, 33.0])
    # heat near T11 but only 13 mm inside the field of view (a body cut by its top face): not added with
    # the depth requirement, added without it
    near_edge = _heat_at({(0.0, -6.0, 37.0): 0.5})
    assert [c.level for c in complete_run(pos, ids, near_edge, LEVELS, cfg, fov_depth=fov_depth)] == ["L2"]
    assert [c.level for c in complete_run(pos, ids, near_edge, LEVELS, dataclasses.replace(cfg, extend_inside_mm=None),
                                          fov_depth=fov_depth)] == ["T11"]
    # off (None), or no field of view given: nothing without heat; never S1 below L5 either
    assert complete_run(pos, ids, _no_heat, LEVELS, dataclasses.replace(cfg, extend_inside_mm=None),
                        fov_depth=fov_depth) == []
    assert complete_run(pos, ids, _no_heat, LEVELS, cfg) == []
    low = np.array([[0.0, 0.0, -120.0], [0.0, 0.0, -150.0]])
    assert [c.level for c in complete_run(low, [level_id("L4"), level_id("L5")], _no_heat, LEVELS, cfg,
                                          fov_depth=fov_depth)] == ["L3"]
    with pytest.raises(ValueError, match="extend_inside_mm must be >= 0"):
        complete_run(pos, ids, _no_heat, LEVELS, dataclasses.replace(cfg, extend_inside_mm=-1.0), fov_depth=fov_depth)


def test_completion_never_invents_sacrum_transitional_or_unknown_levels():
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -36.0]])
    everywhere = lambda p, r: (np.asarray(p, dtype=float), 0.9)  # noqa: E731
    # L4 -> L5 run: the caudal neighbour would be S1 (the detector's background): only L3 above is added
    assert [c.level for c in complete_run(pos, [level_id("L4"), level_id("L5")], everywhere, LEVELS, FILL)] == ["L3"]
    # T12 -> L1 with T13 possible in between: no gap (T13 is optional, the path did not claim it)
    out = complete_run(pos, [level_id("T12"), level_id("L1")], everywhere, LEVELS, FILL)
    assert [c.level for c in out] == ["T11", "L2"]
    # a vocabulary without T11: nothing above T12
    vocab = [v for v in LEVELS if v != level_id("T11")]
    assert [c.level for c in complete_run(pos, [level_id("T12"), level_id("L1")], everywhere, vocab, FILL)] == ["L2"]


def test_completion_switches_off_and_needs_two_named():
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -72.0]])
    ids = [level_id("L1"), level_id("L3")]
    assert complete_run(pos, ids, _no_heat, LEVELS, LabellingConfig(fill_gaps=False, extend_ends=False)) == []
    assert complete_run(pos[:1], ids[:1], _no_heat, LEVELS, FILL) == []
    with pytest.raises(ValueError):
        complete_run(pos, ids[:1], _no_heat, LEVELS, FILL)


def test_standard_neighbour_skips_transitional_levels_and_stops_at_the_ends():
    from data_prep.scan import standard_neighbour

    assert level_id("T12") == standard_neighbour(level_id("L1"), -1) == standard_neighbour(level_id("T13"), -1)
    assert standard_neighbour(level_id("T12"), +1) == level_id("L1")  # not T13
    assert standard_neighbour(level_id("L5"), +1) == level_id("S1")  # not L6
    assert standard_neighbour(level_id("L6"), -1) == level_id("L5")
    assert standard_neighbour(1, -1) is None and standard_neighbour(level_id("S1"), +1) is None


def test_standard_levels_between_skips_transitional_levels():
    from data_prep.scan import anatomical_rank
    from stage1_localize.labelling import _standard_between, _standard_levels_between

    r = anatomical_rank
    assert _standard_levels_between(r(20), r(23)) == [21, 22]  # L1 .. L4: L2, L3
    assert _standard_levels_between(r(18), r(20)) == [19]  # T11 .. L1: T12 (never T13)
    assert _standard_levels_between(r(19), r(20)) == []  # T12 .. L1: T13 is transitional
    assert _standard_levels_between(r(24), r(26)) == []  # L5 .. S1: L6 is transitional
    assert _standard_between(r(17), r(24)) == 6  # T10 .. L5: T11, T12, L1 .. L4


def test_tilt_prior_drops_a_peak_behind_the_column():
    """The myosegmentum-010 pattern: L1's body is not detected, a weak peak 45 mm behind (a spinous process)
    lies a plausible 46 mm above L2's body and its level head says L1. The distance prior alone names it L1;
    the tilt prior (a near-horizontal step) drops it."""
    ids, pos, sc, lp = _column(["L2", "L3", "L4", "L5"])
    junk_pos = pos[0] + np.array([0.0, 45.0, 10.0])  # 45 mm posterior, 10 mm superior: 77 deg off the axis
    pos = np.vstack([junk_pos, pos])
    sc = np.concatenate([[0.15], sc])
    lp = np.vstack([_probs(level_id("L1"), p_true=0.8), lp])
    plain = assign_levels(pos, sc, lp, LEVELS, LabellingConfig(tilt_weight=0.0, spacing_scan_rel_sd=None))
    assert _labels(plain) == ["L1", "L2", "L3", "L4", "L5"]
    tilted = assign_levels(pos, sc, lp, LEVELS, LabellingConfig(tilt_weight=1.0))
    assert _labels(tilted) == ["L2", "L3", "L4", "L5"]
    assert [a.index for a in tilted.assignments] == [1, 2, 3, 4]


def test_tilt_cost_exact_values():
    from stage1_localize.labelling import _tilt_cost

    cfg = LabellingConfig(tilt_weight=2.0, max_tilt_deg=30.0, tilt_sd_deg=10.0)
    sup = np.array([0.0, 0.0, 1.0])
    assert _tilt_cost(np.array([0.0, 10.0, -30.0]), sup, cfg) == 0.0  # 18.4 deg: free
    step = np.array([0.0, np.sin(np.radians(50.0)), np.cos(np.radians(50.0))]) * 35.0  # 50 deg: 20 over
    assert _tilt_cost(step, sup, cfg) == pytest.approx(2.0 * 20.0**2 / 200.0)
    assert _tilt_cost(-step, sup, cfg) == pytest.approx(4.0)  # either sign
    assert _tilt_cost(step, sup, LabellingConfig(tilt_weight=0.0)) == 0.0  # off switch


@pytest.mark.parametrize("field", ["spacing_rel_sd", "tilt_sd_deg", "spacing_scan_rel_sd"])
def test_zero_prior_width_is_a_clear_error(field):
    ids, pos, sc, lp = _column(["L1", "L2"])
    with pytest.raises(ValueError, match=f"labelling.{field} must be > 0"):
        assign_levels(pos, sc, lp, LEVELS, LabellingConfig(**{field: 0.0}))


def _chu2015_018_like():
    """The chu2015-018 pattern (session-18 fold-0 model, rounded): bodies 29-37 mm apart, the level head
    one level too low on the top four (T10 to L1 called T12 to L2) and torn on L2. Rows head to foot:
    ``(z mm, y mm, score, {level: probability})``."""
    rows = [(-36, 226, 0.32, {"T12": 0.49, "T11": 0.34, "L1": 0.16}),
            (-65, 218, 0.59, {"T12": 0.57, "T11": 0.32, "L1": 0.11}),
            (-96, 212, 0.74, {"L1": 0.85, "T12": 0.10, "L2": 0.05}),
            (-129, 205, 0.62, {"L2": 0.76, "L1": 0.23, "L3": 0.01}),
            (-163, 193, 0.69, {"L2": 0.66, "L3": 0.33, "L1": 0.01}),
            (-200, 187, 0.73, {"L3": 0.79, "L4": 0.21}),
            (-238, 187, 0.67, {"L4": 0.97, "L3": 0.02, "L5": 0.01}),
            (-273, 194, 0.61, {"L5": 0.99, "L4": 0.01})]
    pos = np.array([[37.0, y, z] for z, y, _, _ in rows], dtype=float)
    sc = np.array([r[2] for r in rows])
    lp = np.full((len(rows), len(LEVELS)), 1e-4)
    for n, (*_, probs) in enumerate(rows):
        for name, p in probs.items():
            lp[n, LEVELS.index(level_id(name))] = p
    return pos, sc, np.log(lp / lp.sum(1, keepdims=True))


def test_scan_spacing_prior_keeps_a_detected_body_the_level_head_miscounts():
    """Under the population prior (relative sd 0.3) a doubled step costs little, so the cheapest naming drops
    the detected L1 body (score 0.62) and names T12 -> L2 as one 67-mm step, shifting the top four. With
    the scan's own prior (scale from the first naming, the default sd 0.2) every body keeps its place."""
    pos, sc, lp = _chu2015_018_like()
    truth = ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    plain = assign_levels(pos, sc, lp, LEVELS, LabellingConfig(spacing_scan_rel_sd=None))
    assert _labels(plain) == ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    assert [a.index for a in plain.assignments] == [0, 1, 2, 4, 5, 6, 7]  # the body at -129 mm dropped
    assert plain.spacing_scale is None
    res = assign_levels(pos, sc, lp, LEVELS, LabellingConfig())
    assert _labels(res) == truth
    assert [a.index for a in res.assignments] == list(range(1, 8))  # the weak T10 at the top dropped
    assert res.spacing_scale == pytest.approx(1.05, abs=0.03)
    truth_ids = {n + 1: level_id(v) for n, v in enumerate(truth)}
    assert res.cost == pytest.approx(path_cost(pos, sc, lp, LEVELS, truth_ids))


@pytest.mark.parametrize("spacing", [22.0, 35.0, 46.0])
def test_scan_spacing_prior_follows_the_size_of_the_spine(spacing):
    """A child's (22 mm) or a tall adult's (46 mm) spine: the scale is measured, not assumed, so a missing
    level is still found by its doubled gap when the level head says nothing below T12."""
    names = ["T12", "L1", "L2", "L3", "L4", "L5"]
    ids, pos, sc, lp = _column(names, spacing=spacing)
    lp = np.stack([lp[0]] + [_probs(None)] * 5)
    keep = [0, 1, 3, 4, 5]  # L2 missing
    res = assign_levels(pos[keep], sc[keep], lp[keep], LEVELS)
    assert _labels(res) == ["T12", "L1", "L3", "L4", "L5"]
    assert res.spacing_scale == pytest.approx(spacing / 36.0, rel=0.05)


# --- caudal continuation check (``LabellingConfig.caudal_check_weight``) -----------------------------
def _vector(**probs: float) -> np.ndarray:
    """Log-probabilities over ``LEVELS`` with the given level probabilities (rest 1e-4 each)."""
    p = np.full(len(LEVELS), 1e-4)
    for name, v in probs.items():
        p[LEVELS.index(level_id(name))] = v
    return np.log(p / p.sum())


# A real failure (myosegmentum-039, session-37 fold-2 model, rounded): the level head reads the upper
# bodies one level low, the last (true L5, weak peak) as L5 at 1.00; a T12 is in view above L1.
_BODIES = np.array([[34.0, 129.5, -19.1], [37.0, 118.5, -48.0], [37.0, 107.0, -72.5],
                    [40.0, 97.3, -104.0], [37.0, 96.2, -133.9], [37.0, 106.3, -164.6]])
_TRUE = ["T12", "L1", "L2", "L3", "L4", "L5"]
_SCORES = np.array([0.67, 0.54, 0.66, 0.84, 0.56, 0.47])
_READINGS = np.stack([_vector(L1=0.95, L2=0.02, T12=0.02), _vector(L2=0.67, L1=0.33), _vector(L3=0.68, L2=0.32),
                      _vector(L4=0.57, L3=0.43), _vector(L4=0.84, L5=0.15), _vector(L5=1.0)])
_SACRUM = np.array([37.0, 116.0, -195.0])


def _map_probe(radius_mm: float = 12.0):
    """A level map known at the bodies (their readings) and at the sacrum (S1); None elsewhere."""
    points = np.vstack([_BODIES, _SACRUM])
    readings = np.vstack([_READINGS, _vector(S1=1.0)[None]])
    calls = []

    def probe(world_mm):
        calls.append(np.asarray(world_mm))
        d = np.linalg.norm(points - world_mm, axis=1)
        return readings[int(np.argmin(d))] if d.min() <= radius_mm else None

    return probe, calls


def test_caudal_check_keeps_the_l5_that_a_miscounting_level_head_would_drop():
    off = assign_levels(_BODIES, _SCORES, _READINGS, LEVELS, LabellingConfig())  # no level map: no check
    # without the check: the five upper bodies are named L1-L5 and the true L5 is dropped
    assert [(a.index, a.level) for a in off.assignments] == list(zip(range(5), ["L1", "L2", "L3", "L4", "L5"]))
    probe, calls = _map_probe()
    cfg = LabellingConfig()  # the default weight (0.5)
    assert cfg.caudal_check_weight == 0.5
    on = assign_levels(_BODIES, _SCORES, _READINGS, LEVELS, cfg, level_probe=probe)
    # below the false L5 the map still says L5; below the true L5 it says S1
    assert [(a.index, a.level) for a in on.assignments][-5:] == list(zip(range(1, 6), _TRUE[1:]))
    assert calls, "the probe was never asked"
    truth = {i: level_id(n) for i, n in enumerate(_TRUE)}
    assert on.cost <= path_cost(_BODIES, _SCORES, _READINGS, LEVELS, truth, cfg, level_probe=probe) + 1e-9
    # the check's own cost: 0.5 * log(p_L5 / p_S1) one step below the false L5 (index 4 after index 3)
    wrong = {i: level_id(n) for i, n in enumerate(["L1", "L2", "L3", "L4", "L5"])}
    lp5 = _READINGS[5]
    expected = 0.5 * (max(lp5.max(), np.log(1e-4)) - max(lp5[LEVELS.index(level_id("S1"))], np.log(1e-4)))
    gap = (path_cost(_BODIES, _SCORES, _READINGS, LEVELS, wrong, cfg, level_probe=probe)
           - path_cost(_BODIES, _SCORES, _READINGS, LEVELS, wrong, dataclasses.replace(cfg, caudal_check_weight=0.0),
                       level_probe=probe))
    assert gap == pytest.approx(expected, rel=1e-9) and gap > 4.0


def test_caudal_check_is_silent_off_outside_the_image_and_without_a_next_level():
    base = assign_levels(_BODIES, _SCORES, _READINGS, LEVELS, LabellingConfig())
    probe, calls = _map_probe()
    # weight 0: the probe is never asked
    res = assign_levels(_BODIES, _SCORES, _READINGS, LEVELS, LabellingConfig(caudal_check_weight=0.0),
                        level_probe=probe)
    assert not calls and [(a.index, a.label) for a in res.assignments] == [(a.index, a.label) for a in base.assignments]
    assert res.cost == pytest.approx(base.cost)
    # a map that is outside the image everywhere costs nothing
    res = assign_levels(_BODIES, _SCORES, _READINGS, LEVELS, LabellingConfig(caudal_check_weight=0.5),
                        level_probe=lambda w: None)
    assert res.cost == pytest.approx(base.cost)
    assert [a.label for a in res.assignments] == [a.label for a in base.assignments]
    # S1 has no next level in the vocabulary: ending there is never charged
    one = np.array([[0.0, 0.0, 0.0]])
    res = assign_levels(one, [0.9], _vector(S1=1.0)[None], LEVELS, LabellingConfig(caudal_check_weight=5.0),
                        level_probe=lambda w: _vector(L1=1.0))
    assert [a.level for a in res.assignments] == ["S1"]
    assert res.cost == pytest.approx(assign_levels(one, [0.9], _vector(S1=1.0)[None], LEVELS, LabellingConfig()).cost)
