"""compute_score: hand-computed values for both presets, overrides, missing statistics."""

from __future__ import annotations

import pytest

from agemem.reward.components import reward_config
from agemem.reward.score import SCORE_KEYS, compute_score

GOOD = {
    "answered": True, "judge_score": 0.8, "em": 0.0, "f1": 0.5,
    "context_ratio_final": 0.4, "preventive_context_tools": 1, "overflow_count": 0, "key_info_in_context": 0.5,
    "storage_quality": 1.0, "memory_updates_ok": 0, "memory_deletes_ok": 1, "retrieval_relevance": 0.5,
    "tool_call_count": 6, "total_rounds": 6,
    "tool_ok_counts": {"Retrieve_memory": 1, "Add_memory": 4, "Filter_context": 1},
    "stage3_rounds": 2, "stage3_max_rounds": 5, "round_limit_hit": False,
    "format_error_count": 0, "tool_error_count": 0,
}
BAD = {
    "answered": False, "judge_score": 0.0, "context_ratio_final": 1.2, "preventive_context_tools": 0,
    "overflow_count": 1, "key_info_in_context": None, "storage_quality": 0.0, "retrieval_relevance": 0.0,
    "tool_call_count": 0, "total_rounds": 8, "tool_ok_counts": {}, "stage3_rounds": 5, "stage3_max_rounds": 5,
    "round_limit_hit": True, "format_error_count": 3, "tool_error_count": 0,
}


def test_paper_preset_hand_computed() -> None:
    out = compute_score("hotpotqa", "", "yes", GOOD, preset="paper")
    # context = (0.6 + 1 + 0.5)/3 = 0.7; memory = (1 + 1 + 0.5)/3; tool = 0.2 + 0.5 + 0.2*(1 - 2/5) = 0.82
    assert out["context"] == pytest.approx(0.7)
    assert out["memory"] == pytest.approx(2.5 / 3)
    assert out["tool"] == pytest.approx(0.82)  # reported, but the paper's reward has no tool term
    assert out["score"] == pytest.approx(0.8 + 0.7 + 2.5 / 3)
    assert out["penalty_no_answer"] == 0.0 and out["stats_missing"] == 0.0


def test_official_code_preset_hand_computed() -> None:
    out = compute_score("hotpotqa", "", "yes", GOOD, preset="official-code")
    assert out["score"] == pytest.approx(0.5 * 0.8 + 0.15 * 0.7 + 0.15 * 2.5 / 3 + 0.2 * 0.82)


def test_failure_penalties_and_clip() -> None:
    official = compute_score("hotpotqa", "", "yes", BAD, preset="official-code")
    assert official["raw_score"] == pytest.approx(-2.5)  # no answer -1, round limit -1, overflow -0.5
    assert official["score"] == -1.0
    paper = compute_score("hotpotqa", "", "yes", BAD, preset="paper")
    assert paper["score"] == pytest.approx(-2.5 + 2 * 0.0 / 3)
    assert paper["r_compression"] == 0.0 and paper["tool_efficiency"] == 0.0


def test_efficiency_only_for_an_answer_and_by_rounds() -> None:
    # Reference defect: a rollout that never answers got the best efficiency bonus.
    unanswered = dict(GOOD, answered=False, stage3_rounds=1)
    assert compute_score("h", "", "", unanswered)["tool_efficiency"] == 0.0
    fast = compute_score("h", "", "", dict(GOOD, stage3_rounds=1))["tool_efficiency"]
    slow = compute_score("h", "", "", dict(GOOD, stage3_rounds=4))["tool_efficiency"]
    assert fast == pytest.approx(0.16) and slow == pytest.approx(0.04)


def test_preset_and_overrides_from_extra_info() -> None:
    info = dict(GOOD, reward_preset="official-code", reward_overrides={"clip_max": 0.5})
    assert compute_score("h", "", "", info)["score"] == 0.5
    # reward_kwargs from verl win over what the episode recorded
    assert compute_score("h", "", "", info, overrides={"clip_max": 0.6})["score"] == 0.6
    assert compute_score("h", "", "", dict(GOOD, format_error_count=2),
                         overrides={"format_error_penalty": -0.1})["penalty_format"] == pytest.approx(-0.2)


def test_same_keys_for_every_sample_and_missing_stats() -> None:
    outs = [compute_score("h", "", "", GOOD), compute_score("h", "", "", BAD), compute_score("h", "x", "y", None),
            compute_score("h", "x", "y", {"index": 3})]
    assert all(tuple(o) == SCORE_KEYS for o in outs)
    assert all(isinstance(v, float) for o in outs for v in o.values())
    assert outs[2]["stats_missing"] == 1.0 and outs[2]["score"] == -1.0
    assert outs[3]["stats_missing"] == 1.0 and outs[3]["penalty_no_answer"] == -1.0


def test_unknown_preset_and_field_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown reward preset"):
        reward_config("nope")
    with pytest.raises(ValueError, match="w_bogus"):
        reward_config("paper", {"w_bogus": 1})
