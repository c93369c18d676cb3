"""A model with a chat template (an SFT run's) is served with the ids training used for the same messages."""
import openai
import pytest

from aigc.data.chat_tokens import encode_chat
from aigc.generate.text import SamplingParams, TextGenerator
from tests.serve.conftest import seed_billing
from tests.serve.helpers import db, start, tenant

MESSAGES = [{"role": "system", "content": "House style: short."},
            {"role": "user", "content": "Write the description for this product.\nname: Nook Mug\ncolour: sky blue"}]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, chat_model):
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), admin_token="operator-secret")
    sessions = db(settings)
    seed_billing(sessions)
    live = start(settings, Registry.from_paths([f"chat={chat_model}"], max_batch=4, context=512))
    live.sessions = sessions
    yield live
    live.stop()


def test_server_prompt_ids_are_the_training_ids(chat_server, chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    answer = {"role": "assistant", "content": "Meet the Nook Mug."}
    trained = encode_chat(tok, MESSAGES + [answer])  # what SFT trains on
    engine = chat_server.service.registry.acquire("chat")  # the engine the route encodes with
    served = engine.encode_chat(MESSAGES)
    assert served == trained.input_ids[: len(served)] and tok.decode(trained.input_ids[len(served):]).startswith("Meet the Nook Mug.")

    org, key = tenant(chat_server.sessions, "acme-chat", "payg")
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key=key, max_retries=0)
    r = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=16, temperature=0)
    assert r.usage.prompt_tokens == len(served)
    # the same answer as the CLI's --chat path with the tenant's watermark: the server decoded from those ids
    mark = chat_server.service.governance.tenant(org).mark()
    ref = TextGenerator.from_path(chat_model).chat([MESSAGES], SamplingParams(max_new_tokens=16, temperature=0, watermark=mark))[0]
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    chunks = list(client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
