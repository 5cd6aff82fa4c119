"""The context window with the real Qwen2.5 tokenizer: counts, incremental ids, rewrites."""

from __future__ import annotations

from agemem.agent.context import ContextWindow, extractive_summary


def _window(tok, budget: int = 4096) -> ContextWindow:
    return ContextWindow(tok, "You are a test assistant.", budget)


def test_count_is_the_real_tokenizer(chat_tokenizer) -> None:
    w = _window(chat_tokenizer)
    w.append("user", "Hello there, how are you?", "stage")
    rendered = chat_tokenizer.tok.apply_chat_template(w.messages(), tokenize=False, add_generation_prompt=True)
    assert w.token_count() == len(chat_tokenizer.tok.encode(rendered, add_special_tokens=False))
    # A chars/4 estimate would differ: the count must come from the tokenizer, not the length.
    w.append("assistant", "一二三四五六七八九十" * 20, "assistant")
    assert w.token_count() == chat_tokenizer.count(w.messages())
    assert w.ratio() == w.token_count() / 4096


def test_incremental_delta_equals_full_render(chat_tokenizer) -> None:
    tok = chat_tokenizer
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "facts"}]
    stream = tok.prompt_ids(msgs)
    reply1 = tok.encode("<think>a</think><tool_call>{}</tool_call>") + [tok.eos_id]
    stream += reply1
    msgs += [{"role": "assistant", "content": "<think>a</think><tool_call>{}</tool_call>"}]
    new = [{"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
    stream += tok.delta_ids(new, last_response_ids=reply1)
    msgs += new
    assert stream == tok.prompt_ids(msgs)
    # A turn cut off by max_tokens (no end token) is closed as the template would close it.
    reply2 = tok.encode("cut off")
    stream += reply2
    msgs += [{"role": "assistant", "content": "cut off"}]
    stream += tok.delta_ids([], last_response_ids=reply2)  # no-action round: a new assistant turn
    assert stream == tok.prompt_ids(msgs)


def test_truncate_keeps_system_and_current_stage_message(chat_tokenizer) -> None:
    w = _window(chat_tokenizer, budget=300)
    for i in range(6):
        w.append("user", f"old distractor {i} " + "blah " * 30, "stage")
        w.append("assistant", f"reply {i} " + "words " * 10, "assistant")
        w.append("tool", f"result {i}", "tool")
    w.append("user", "Current question: who?", "stage")
    assert w.token_count() > 300
    dropped, fits = w.truncate_oldest(300)
    assert fits and dropped > 0 and w.token_count() <= 300
    assert w.entries[0].kind == "system" and w.entries[-1].content == "Current question: who?"
    # An assistant message never loses its tool result: no tool message follows a user message directly.
    kinds = [e.kind for e in w.entries]
    for a, b in zip(kinds, kinds[1:]):
        assert not (a == "stage" and b == "tool")


def test_truncate_reports_when_it_cannot_fit(chat_tokenizer) -> None:
    w = _window(chat_tokenizer, budget=20)
    w.append("user", "a protected message that is far too long " * 5, "stage")
    dropped, fits = w.truncate_oldest(20)
    assert (dropped, fits) == (0, False)
    assert len(w.entries) == 2


def test_summary_span_selection_and_replacement(chat_tokenizer) -> None:
    w = _window(chat_tokenizer)
    w.append("user", "d1", "stage")  # 1
    w.append("assistant", "a1", "assistant", round_id=0)  # 2
    w.append("user", "d2", "stage")  # 3 (current stage message: protected)
    w.append("assistant", "a2", "assistant", round_id=1)  # 4 (invoking turn)
    assert w.select_span("all", current_round=1).indices == [1, 2]
    assert w.select_span("1", current_round=1).indices == []  # the last earlier message is protected
    assert w.select_span("1-2", current_round=1).indices == [1, 2]
    assert w.select_span("-3", current_round=1).error
    assert w.select_span("3-1", current_round=1).error
    v = w.version
    w.replace_with_summary([1, 2], "summary text", stage=2)
    assert w.version > v
    assert [e.content for e in w.entries][1:] == ["[summary of 2 messages]\nsummary text", "d2", "a2"]


def test_only_latest_stage_message_is_protected(chat_tokenizer) -> None:
    w = _window(chat_tokenizer)
    first = w.append("user", "q1", "stage")
    second = w.append("user", "q2", "stage")
    assert not first.protected and second.protected
    assert w.filter_candidates(current_round=-1) == [1]


def test_extractive_summary_picks_central_sentences(embed) -> None:
    texts = ["The film was directed by Tim Burton. It stars Johnny Depp.",
             "Tim Burton directed the biographical film. The weather was nice. Johnny Depp played Ed Wood."]
    summary = extractive_summary(texts, embed, ratio=0.4, max_sentences=2)
    assert 0 < len(summary) < len(" ".join(texts))
    assert "weather" not in summary
