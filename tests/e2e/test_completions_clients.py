"""Legacy /v1/completions through nginx with the clients people already have (issue #17):
LangChain's `OpenAI` LLM batching prompts, the openai client with logprobs and echo."""

from __future__ import annotations

import openai
import pytest
from langchain_core.language_models import LanguageModelInput
from langchain_openai import OpenAI as LangChainOpenAI
from pydantic import SecretStr

from .conftest import MODEL, Mesh

pytestmark = pytest.mark.e2e

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,"]


def test_langchain_openai_llm_batch_answers_every_prompt(mesh: Mesh) -> None:
    # LangChain sends the three prompts in one request: a 400 before issue #17.
    llm = LangChainOpenAI(
        base_url=mesh.v1, api_key=SecretStr("not-needed"), model=MODEL, max_tokens=6, temperature=0, max_retries=0
    )
    texts = llm.batch(list[LanguageModelInput](PROMPTS))
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    # Each prompt's own answer, in order: the same as asking for it alone.
    assert texts[1] == llm.invoke(PROMPTS[1])


def test_prompt_list_times_n_gives_indexed_choices(mesh: Mesh) -> None:
    reply = mesh.openai().completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=3, seed=5)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage is not None and reply.usage.completion_tokens == 4 * 3
    alone = mesh.openai().completions.create(model=MODEL, prompt=PROMPTS[1], n=2, max_tokens=3, seed=5)
    assert [c.text for c in reply.choices[2:]] == [c.text for c in alone.choices]


def test_logprobs_and_echo_parse_into_the_openai_types(mesh: Mesh) -> None:
    reply = mesh.openai().completions.create(
        model=MODEL, prompt=PROMPTS[:2], logprobs=2, echo=True, max_tokens=3, temperature=0
    )
    assert len(reply.choices) == 2
    for choice, prompt in zip(reply.choices, PROMPTS[:2], strict=True):
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
        n = len(lp.tokens)
        assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
        # The prompt's tokens first (unscored), then the three generated ones, each with its top 2.
        assert "".join(lp.tokens) == choice.text
        assert lp.token_logprobs[-3:] == [v for v in lp.token_logprobs[-3:] if isinstance(v, float)]
        assert all(v is None for v in lp.token_logprobs[: n - 3])
        assert all(len(top) == 2 for top in lp.top_logprobs[-3:] if top is not None)
        offsets = [0]
        for token in lp.tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        assert lp.text_offset == offsets


def test_logprobs_without_echo_cover_only_the_answer(mesh: Mesh) -> None:
    reply = mesh.openai().completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=1, max_tokens=4, temperature=0)
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset is not None and lp.text_offset[0] == 0 and len(lp.tokens) == 4


def test_streamed_choices_carry_their_index(mesh: Mesh) -> None:
    stream = mesh.openai().completions.create(
        model=MODEL, prompt=PROMPTS, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    texts: dict[int, str] = {}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert sorted(texts) == [0, 1, 2] and finished == {0, 1, 2}
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    whole = mesh.openai().completions.create(model=MODEL, prompt=PROMPTS, max_tokens=4, temperature=0)
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]


def test_token_prompts_are_read_as_tokens(mesh: Mesh) -> None:
    client = mesh.openai()
    one = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=3, temperature=0)
    assert one.usage is not None and one.usage.prompt_tokens == 4 and one.choices[0].text
    two = client.completions.create(model=MODEL, prompt=[[1, 2, 3, 4], [5, 6]], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == one.choices[0].text
    assert two.usage is not None and two.usage.prompt_tokens == 6


def test_suffix_is_refused_with_a_clear_400(mesh: Mesh) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        mesh.openai().completions.create(model=MODEL, prompt="def f(", suffix="    return x", max_tokens=4)
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "suffix" and "suffix" in body["message"]
