"""HT-GRPO partition, credit weights and stages against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from htgrpo.algorithms.credit import (
    Stage,
    StageSchedule,
    credit_weights,
    sample_scored,
    stage_candidates,
    structure_count,
    structure_mask,
    structure_rank,
    token_advantages,
    validate_credit,
    validate_fraction,
)
from htgrpo.config import ConfigError


def close(actual: torch.Tensor, expected: list, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# Row 0, by hand: commit step 0 -> positions 1 (conf 0.3), 3 (conf 0.7)  => 3, 1
#                 commit step 1 -> positions 2 (0.8), 4 (0.8): tie       => 2, 4 (by position)
#                 commit step 2 -> positions 0 (0.9), 5 (0.1)            => 0, 5
#   order [3, 1, 2, 4, 0, 5]  ->  rank per position [4, 1, 2, 0, 3, 5]
# Row 1: everything committed at step 0 with equal confidence -> position order.
COMMIT = torch.tensor([[2, 0, 1, 0, 1, 2], [0, 0, 0, 0, 0, 0]])
CONF = torch.tensor([[0.9, 0.3, 0.8, 0.7, 0.8, 0.1], [0.5] * 6])
# Row 0 entropies; ascending: 4 (0.0), 1 (0.1), 5 (0.1), 0 (0.5), 2 (0.5), 3 (0.9)  -> rank [3, 1, 4, 5, 0, 2]
#                  descending: 3 (0.9), 0 (0.5), 2 (0.5), 1 (0.1), 5 (0.1), 4 (0.0) -> rank [1, 3, 2, 0, 5, 4]
ENT = torch.tensor([[0.5, 0.1, 0.5, 0.9, 0.0, 0.1], [0.2] * 6])


# ---- partition --------------------------------------------------------------------------------------------------
def test_decode_step_rank_with_ties() -> None:
    rank = structure_rank(COMMIT, ENT, CONF, key="decode_step")
    assert rank.dtype == torch.long
    assert rank.tolist() == [[4, 1, 2, 0, 3, 5], [0, 1, 2, 3, 4, 5]]


def test_decode_step_mask_fractions() -> None:
    # N = 6: 0.25*6 = 1.5 -> 2 (half up); 0.5*6 = 3; 0.1*6 = 0.6 -> 1; 0.05*6 = 0.3 -> 0 -> at least 1; 1.0 -> 6
    m = structure_mask(COMMIT, ENT, CONF, key="decode_step", fraction=0.25)
    assert m.dtype == torch.bool
    assert m.tolist() == [[False, True, False, True, False, False], [True, True, False, False, False, False]]
    m = structure_mask(COMMIT, ENT, CONF, fraction=0.5)
    assert m[0].tolist() == [False, True, True, True, False, False]
    assert structure_mask(COMMIT, ENT, CONF, fraction=0.1)[0].tolist() == [False, False, False, True, False, False]
    assert structure_mask(COMMIT, ENT, CONF, fraction=0.05).sum(dim=1).tolist() == [1, 1]
    assert structure_mask(COMMIT, ENT, CONF, fraction=1.0).all()
    assert [structure_count(6, f) for f in (0.25, 0.5, 0.1, 0.05, 1.0)] == [2, 3, 1, 1, 6]


def test_entropy_rank_both_orders() -> None:
    asc = structure_rank(COMMIT, ENT, CONF, key="entropy")
    assert asc.tolist() == [[3, 1, 4, 5, 0, 2], [0, 1, 2, 3, 4, 5]]
    desc = structure_rank(None, ENT, None, key="entropy", entropy_order="descending")
    assert desc.tolist() == [[1, 3, 2, 0, 5, 4], [0, 1, 2, 3, 4, 5]]
    m = structure_mask(None, ENT, None, key="entropy", fraction=0.5)
    assert m[0].tolist() == [False, True, False, False, True, True]  # positions 4, 1, 5


def test_nan_confidence_sorts_last_within_its_step() -> None:
    rank = structure_rank(torch.tensor([[0, 0, 0]]), None, torch.tensor([[float("nan"), 0.2, 0.9]]))
    assert rank.tolist() == [[2, 1, 0]]


def test_partition_validation() -> None:
    with pytest.raises(ValueError, match="partition.fraction"):
        structure_mask(COMMIT, ENT, CONF, fraction=0.0)
    with pytest.raises(ValueError, match="partition.fraction"):
        structure_mask(COMMIT, ENT, CONF, fraction=1.5)
    with pytest.raises(ValueError, match="partition.key"):
        structure_rank(COMMIT, ENT, CONF, key="random")
    with pytest.raises(ValueError, match="partition.entropy_order"):
        structure_rank(COMMIT, ENT, CONF, key="entropy", entropy_order="up")


def test_validate_fraction() -> None:
    assert validate_fraction(1, "x.y") == 1.0
    assert validate_fraction(0.3, "x.y") == 0.3
    for bad in (0, -0.1, 1.01, float("nan"), "a", True):
        with pytest.raises(ValueError, match="stages.scored_fraction"):
            validate_fraction(bad, "stages.scored_fraction")


# ---- credit -----------------------------------------------------------------------------------------------------
RANK4 = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
S4 = torch.tensor([[True, False, False, False], [False, False, False, True]])


def test_binary_weights_by_hand() -> None:
    # alpha 1: [2, 1, 1, 1], mean 5/4 -> [1.6, 0.8, 0.8, 0.8]
    close(credit_weights(RANK4, S4, "binary", alpha=1.0, normalize=False), [[2, 1, 1, 1], [1, 1, 1, 2]])
    close(credit_weights(RANK4, S4, "binary", alpha=1.0), [[1.6, 0.8, 0.8, 0.8], [0.8, 0.8, 0.8, 1.6]])
    # alpha 0.5: [1.5, 1, 1, 1], mean 4.5/4 = 1.125 -> [4/3, 8/9, 8/9, 8/9]
    close(credit_weights(RANK4, S4, "binary", alpha=0.5)[0], [4 / 3, 8 / 9, 8 / 9, 8 / 9])


def test_soft_weights_by_hand() -> None:
    # N = 4, alpha 1, gamma 1: 1 + (1 - r/4) = [2, 1.75, 1.5, 1.25]; mean 6.5/4 = 1.625
    w = credit_weights(RANK4, S4, "soft", alpha=1.0, gamma=1.0, normalize=False)
    close(w, [[2, 1.75, 1.5, 1.25], [1.25, 1.5, 1.75, 2]])
    wn = credit_weights(RANK4, S4, "soft", alpha=1.0, gamma=1.0)
    close(wn[0], [2 / 1.625, 1.75 / 1.625, 1.5 / 1.625, 1.25 / 1.625])
    # gamma 2: 1 + (1 - r/4)^2 = [2, 1.5625, 1.25, 1.0625]
    close(credit_weights(RANK4, S4, "soft", alpha=1.0, gamma=2.0, normalize=False)[0], [2, 1.5625, 1.25, 1.0625])


def test_normalisation_and_uniform() -> None:
    for kind in ("binary", "soft", "uniform"):
        w = credit_weights(RANK4, S4, kind, alpha=2.0, gamma=0.5)
        close(w.mean(dim=1), [1.0, 1.0])
    close(credit_weights(RANK4, S4, "uniform", alpha=3.0), [[1, 1, 1, 1], [1, 1, 1, 1]])


def test_credit_validation() -> None:
    with pytest.raises(ValueError, match="credit.kind"):
        credit_weights(RANK4, S4, "entropy")
    with pytest.raises(ValueError, match="credit.alpha"):
        credit_weights(RANK4, S4, "binary", alpha=-1.0)
    with pytest.raises(ValueError, match="credit.gamma"):
        credit_weights(RANK4, S4, "soft", gamma=-1.0)
    # the one range check: alpha >= 0 (0 allowed), gamma > 0 (0 rejected), both finite
    assert validate_credit("soft", 0, 2) == ("soft", 0.0, 2.0)
    for alpha, gamma, key in ((-0.5, 1.0, "credit.alpha"), (float("nan"), 1.0, "credit.alpha"),
                              (1.0, 0.0, "credit.gamma"), (1.0, float("inf"), "credit.gamma"), (True, 1.0, "credit.alpha")):
        with pytest.raises(ConfigError) as err:
            validate_credit("binary", alpha, gamma)
        assert err.value.key == key


def test_token_advantages_by_hand() -> None:
    w = torch.tensor([[1.6, 0.8, 0.8, 0.8], [1.0, 1.0, 1.0, 1.0]])
    close(token_advantages(torch.tensor([2.0, -1.0]), w), [[3.2, 1.6, 1.6, 1.6], [-1, -1, -1, -1]])


# ---- stages -----------------------------------------------------------------------------------------------------
G, S, R = Stage.GLOBAL, Stage.STRUCTURE, Stage.REFINE


def test_stage_enum_values() -> None:
    assert [s.value for s in Stage] == ["global", "structure", "refine"]
    assert Stage("refine") is R and G == "global"


def test_inner_schedule() -> None:
    sched = StageSchedule()
    assert sched.num_inner_iterations == 6
    assert sched.stages(0) == (G, G, S, S, R, R)
    assert sched.stages(17) == (G, G, S, S, R, R)  # the global step does not matter
    assert StageSchedule(1, 0, 2).stages(0) == (G, R, R)
    assert StageSchedule(3, 0, 0).stages(5) == (G, G, G)
    with pytest.raises(ValueError, match="inner_iteration"):
        sched.stage_for(6, 0)


def test_outer_schedule() -> None:
    sched = StageSchedule(1, 1, 1, mode="outer", steps_per_stage=2)
    assert [sched.stage_for(0, step) for step in range(8)] == [G, G, S, S, R, R, G, G]
    assert sched.num_inner_iterations == 3
    assert sched.stages(3) == (S, S, S)  # every inner iteration of a batch shares its step's stage
    sched = StageSchedule(2, 1, 0, mode="outer")
    assert [sched.stage_for(1, step) for step in range(6)] == [G, G, S, G, G, S]


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="stages.n_global"):
        StageSchedule(n_global=-1)
    with pytest.raises(ValueError, match="stages.n_struct"):
        StageSchedule(n_struct=1.5)
    with pytest.raises(ValueError, match="stages.n_refine"):
        StageSchedule(0, 0, 0)
    with pytest.raises(ValueError, match="stages.mode"):
        StageSchedule(mode="both")
    with pytest.raises(ValueError, match="stages.steps_per_stage"):
        StageSchedule(mode="outer", steps_per_stage=0)
    StageSchedule(0, 0, 1).validate()


def test_stage_candidates() -> None:
    structure = torch.tensor([[True, False, True, False]])
    assert stage_candidates(G, structure).tolist() == [[True, True, True, True]]
    assert stage_candidates("structure", structure).tolist() == [[True, False, True, False]]
    assert stage_candidates(R, structure).tolist() == [[False, True, False, True]]


# ---- sample_scored ----------------------------------------------------------------------------------------------
CAND = torch.zeros(3, 10, dtype=torch.bool)
CAND[0] = True          # 10 candidates
CAND[1, [1, 4, 8]] = True  # 3 candidates
# row 2: none


def test_sample_scored_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    # fraction 0.5: 5 of 10, round(1.5) = 2 of 3, 0 of 0
    out = sample_scored(CAND, 0.5, gen)
    assert out.sum(dim=1).tolist() == [5, 2, 0]
    assert not (out & ~CAND).any()
    # fraction 0.1: 1 of 10, round(0.3) = 0 -> at least 1 of 3, 0 of 0
    assert sample_scored(CAND, 0.1, gen).sum(dim=1).tolist() == [1, 1, 0]
    assert torch.equal(sample_scored(CAND, 1.0, gen), CAND)


def test_sample_scored_reproducible() -> None:
    a = [sample_scored(CAND, 0.5, g) for g in [torch.Generator().manual_seed(7)] * 3]
    b = [sample_scored(CAND, 0.5, g) for g in [torch.Generator().manual_seed(7)] * 3]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])  # successive draws differ


def test_sample_scored_is_uniform_over_candidates() -> None:
    cand = torch.zeros(4000, 6, dtype=torch.bool)
    cand[:, [0, 2, 3, 5]] = True
    out = sample_scored(cand, 0.25, torch.Generator().manual_seed(1))  # 1 of 4 per row
    counts = out.sum(dim=0)
    assert counts[[1, 4]].tolist() == [0, 0]
    assert out.sum().item() == 4000
    assert all(850 < c < 1150 for c in counts[[0, 2, 3, 5]].tolist())  # expected 1000 each


def test_sample_scored_validation() -> None:
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match="stages.scored_fraction"):
            sample_scored(CAND, bad, None)
