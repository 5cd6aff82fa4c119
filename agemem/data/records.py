"""Typed records: a normalised HotpotQA question and the three-stage episode script built from it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Paragraph(BaseModel):
    title: str
    sentences: list[str]


class SupportingFact(BaseModel):
    title: str
    sent_id: int
    sentence: str | None = Field(None, description="Resolved sentence text, when the index is valid.")


class HotpotRecord(BaseModel):
    """One HotpotQA question, whatever shape it was read from."""

    id: str
    question: str
    answer: str | None = Field(None, description="None for unlabelled records (usable for inference only).")
    type: str | None = None
    level: str | None = None
    context: list[Paragraph]
    supporting_facts: list[SupportingFact] = Field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.answer and self.answer.strip())


class Distractor(BaseModel):
    text: str
    source: str = Field(description="'offline:<record id>', 'llm:<model>' or 'fallback'.")


class EpisodeScript(BaseModel):
    """Everything an episode needs, deterministic given the record and seed.

    Stage 1 injects ``stage1_turns`` casual user turns carrying the record's paragraphs; stage 2
    injects ``distractors`` (filled by a synthesizer; empty slots until then); stage 3 asks
    ``question``. ``gold_answer`` and ``supporting_facts`` are for the reward and metrics only and
    are never shown to the policy.
    """

    episode_id: str
    record_id: str
    seed: int
    split: str = Field("train", description="'train' or 'eval' (deterministic by record id).")
    stage1_turns: list[str]
    distractor_slots: int
    distractors: list[Distractor] = Field(default_factory=list)
    question: str
    gold_answer: str | None
    supporting_facts: list[SupportingFact] = Field(default_factory=list)
    titles: list[str] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        """Has a gold answer: training and judged evaluation need one."""
        return bool(self.gold_answer and self.gold_answer.strip())

    @property
    def supporting_sentences(self) -> list[str]:
        return [f.sentence for f in self.supporting_facts if f.sentence]

    @property
    def distractors_filled(self) -> bool:
        return len(self.distractors) >= self.distractor_slots
