"""Frameworks people build with, unchanged, against a live server on a tiny model: LangChain's ChatOpenAI and
instructor (dev dependencies), in their JSON and their function-calling modes (the latter on the 2048-token
server: the tools' listing makes a long prompt for a character model)."""
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


@pytest.fixture(scope="module")
def close_all_bias(text_model):
    """As close_bias, and arrays too, with the object's close strongest: free JSON (json_mode) from a random-ish model
    has no schema to bound it (a number's digits or nested arrays could run on to the context's end)."""
    tok = TextGenerator.from_path(text_model).tokenizer
    vocab = tok.get_vocab()
    return {vocab[c]: b for c, b in (('"', 8), ("]", 8), ("}", 12)) if c in vocab}


def chat(server, key, model="rand", **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.url + "/v1", api_key=key, model=model, max_retries=0, **{"temperature": 0, **kw})


def test_langchain_invoke_stream_batch(server, acme):
    llm = chat(server, acme[1], max_tokens=12)
    msg = llm.invoke("Hello")
    assert isinstance(msg.content, str) and msg.usage_metadata["output_tokens"] >= 1
    streamed = "".join(c.content for c in llm.stream("Hello"))
    assert streamed == msg.content  # greedy: the stream spells the same answer
    out = llm.batch(["Hello", "Tea"])
    assert len(out) == 2 and out[0].content == msg.content


def test_langchain_structured_output(server, acme, close_bias, close_all_bias):
    got = chat(server, acme[1], temperature=1.0, seed=1, logit_bias=close_bias).with_structured_output(Product, method="json_schema").invoke("A product")
    assert isinstance(got, Product) and len(got.title) <= 4
    parsed = chat(server, acme[1], temperature=1.0, seed=2, logit_bias=close_all_bias).with_structured_output(
        None, method="json_mode").invoke("A product, as JSON")
    assert isinstance(parsed, dict)


def test_langchain_function_calling_and_tools(long_server, close_bias):
    from langchain_core.tools import tool

    from tests.serve.helpers import tenant

    _, key = tenant(long_server.sessions, "lc-tools", "payg")
    got = chat(long_server, key, "long-chat", temperature=1.0, seed=4, max_tokens=200).with_structured_output(
        Product, method="function_calling").invoke("A product")
    assert isinstance(got, Product) and len(got.title) <= 4

    class StockArgs(BaseModel):  # (bounded: a random model's free string could run on to max_tokens)
        sku: str = Field(max_length=6)
        warehouse: int

    @tool(args_schema=StockArgs)
    def stock(sku: str, warehouse: int) -> str:
        """How many items of a product a warehouse holds."""
        return "3"

    llm = chat(long_server, key, "long-plain", temperature=1.0, seed=5, max_tokens=200, logit_bias=close_bias).bind_tools(
        [stock], tool_choice="stock")
    msg = llm.invoke("How many A1 are in warehouse 2?")
    (call,) = msg.tool_calls
    assert call["name"] == "stock" and set(call["args"]) == {"sku", "warehouse"} and isinstance(call["args"]["warehouse"], int)
    # the agent loop's next turn: LangChain replays the call and sends the tool's result
    from langchain_core.messages import HumanMessage, ToolMessage

    answer = chat(long_server, key, "long-plain", max_tokens=5).bind_tools([stock]).invoke(
        [HumanMessage("How many A1 are in warehouse 2?"), msg, ToolMessage(stock.invoke(call["args"]), tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    streamed = None
    for piece in llm.stream("How many A1 are in warehouse 2?"):  # LangChain adds the streamed tool-call chunks up
        streamed = piece if streamed is None else streamed + piece
    assert streamed.tool_calls and streamed.tool_calls[0]["name"] == "stock"
    assert isinstance(streamed.tool_calls[0]["args"]["warehouse"], int)


def test_instructor_json_modes(server, acme):
    import instructor

    raw = openai.OpenAI(base_url=server.url + "/v1", api_key=acme[1], max_retries=0)
    client = instructor.from_openai(raw, mode=instructor.Mode.JSON_SCHEMA)
    got = client.chat.completions.create(model="rand", response_model=Product, max_retries=0, seed=3,
                                         messages=[{"role": "user", "content": "A product"}])
    assert isinstance(got, Product)


def test_instructor_tools_mode(long_server):
    import instructor

    from tests.serve.helpers import tenant

    _, key = tenant(long_server.sessions, "instructor-tools", "payg")
    raw = openai.OpenAI(base_url=long_server.url + "/v1", api_key=key, max_retries=0)
    client = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
    got = client.chat.completions.create(model="long-chat", response_model=Product, max_retries=0, seed=6, max_tokens=200,
                                         messages=[{"role": "user", "content": "A product"}])
    assert isinstance(got, Product) and got.colour in (Colour.red, Colour.green)
