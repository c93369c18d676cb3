"""Frameworks people build with, unchanged, against a live server on a tiny model: LangChain's ChatOpenAI and
instructor (dev dependencies). Tool calling is not implemented yet: the function-calling paths are refused by name."""
from enum import Enum
from typing import Optional

import openai
import pytest
from pydantic import BaseModel, Field

from aigc.generate.text import TextGenerator


class Colour(str, Enum):
    red = "red"
    green = "green"


class Product(BaseModel):  # small enough for the test model's 128-token context
    title: str = Field(max_length=4)
    colour: Colour
    note: Optional[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def close_bias(text_model):
    """Nudges toward closing quotes and braces, so a random-ish model ends its JSON object within the budget."""
    tok = TextGenerator.from_path(text_model).tokenizer
    return {tok.convert_tokens_to_ids(c): 8 for c in '"}'}


def chat(server, key, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.url + "/v1", api_key=key, model="rand", max_retries=0, **{"temperature": 0, **kw})


def test_langchain_invoke_stream_batch(server, acme):
    llm = chat(server, acme[1], max_tokens=12)
    msg = llm.invoke("Hello")
    assert isinstance(msg.content, str) and msg.usage_metadata["output_tokens"] >= 1
    streamed = "".join(c.content for c in llm.stream("Hello"))
    assert streamed == msg.content  # greedy: the stream spells the same answer
    out = llm.batch(["Hello", "Tea"])
    assert len(out) == 2 and out[0].content == msg.content


def test_langchain_structured_output(server, acme, close_bias):
    got = chat(server, acme[1], temperature=1.0, seed=1).with_structured_output(Product, method="json_schema").invoke("A product")
    assert isinstance(got, Product) and len(got.title) <= 4
    parsed = chat(server, acme[1], temperature=1.0, seed=2, logit_bias=close_bias).with_structured_output(
        None, method="json_mode").invoke("A product, as JSON")
    assert isinstance(parsed, dict)
    with pytest.raises(openai.BadRequestError, match="tools"):
        chat(server, acme[1]).with_structured_output(Product, method="function_calling").invoke("A product")


def test_instructor_json_modes(server, acme):
    import instructor

    raw = openai.OpenAI(base_url=server.url + "/v1", api_key=acme[1], max_retries=0)
    client = instructor.from_openai(raw, mode=instructor.Mode.JSON_SCHEMA)
    got = client.chat.completions.create(model="rand", response_model=Product, max_retries=0, seed=3,
                                         messages=[{"role": "user", "content": "A product"}])
    assert isinstance(got, Product)
    tools = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
    with pytest.raises(Exception, match="tools"):
        tools.chat.completions.create(model="rand", response_model=Product, max_retries=0,
                                      messages=[{"role": "user", "content": "A product"}])
