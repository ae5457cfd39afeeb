"""Drives Breakwater with an official provider SDK, as an agent does: the
SDK's own retries are off, so what is retried is the sidecar's doing.

    python sdk_calls.py openai|anthropic BASE_URL SCENARIO

Scenarios: plain, limited (a completion); stream, stall (a streamed one);
failover (openai: a completion with the raw answer's headers). Prints one
JSON object: what the SDK got, and how long it took.
"""
import json
import sys
import time

sdk, base_url, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
messages = [{"role": "user", "content": "Extract the invoice total."}]
if sdk == "openai":
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="sk-the-agent-holds-none", max_retries=0, timeout=20)
else:
    import anthropic

    client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-the-agent-holds-none", max_retries=0, timeout=20)


def complete(model):
    if sdk == "openai":
        return client.chat.completions.create(model=model, messages=messages).choices[0].message.content
    return client.messages.create(model=model, max_tokens=64, messages=messages).content[0].text


def stream(model):
    if sdk == "openai":
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    else:
        with client.messages.stream(model=model, max_tokens=64, messages=messages) as events:
            yield from events.text_stream


started = time.monotonic()
result = {"scenario": scenario}
chunks = []
try:
    if scenario in ("plain", "limited"):
        result["content"] = complete(scenario)
    elif scenario == "failover":
        raw = client.chat.completions.with_raw_response.create(model="big", messages=messages)
        answer = raw.parse()
        result["content"] = answer.choices[0].message.content
        result["model"] = answer.model
        result["failover"] = raw.headers.get("x-breakwater-failover")
    else:
        for text in stream(scenario):
            chunks.append([text, round(time.monotonic() - started, 3)])
        result["chunks"] = chunks
except Exception as error:  # the scenario reports what the agent would see
    result["error"] = type(error).__name__
    result["chunks_before_error"] = chunks
result["seconds"] = round(time.monotonic() - started, 3)
print(json.dumps(result))
