"""Drives Breakwater with the official OpenAI Python SDK, as an agent does:
the SDK's own retries are off, so what is retried is the sidecar's doing.

    python openai_calls.py BASE_URL SCENARIO

Prints one JSON object: what the SDK got, and how long it took.
"""
import json
import sys
import time

import openai

base_url, scenario = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="sk-the-agent-holds-none", max_retries=0, timeout=20)
messages = [{"role": "user", "content": "Extract the invoice total."}]
started = time.monotonic()
result = {"scenario": scenario}
try:
    if scenario in ("plain", "limited"):
        answer = client.chat.completions.create(model=scenario, messages=messages)
        result["content"] = answer.choices[0].message.content
    elif scenario == "failover":
        raw = client.chat.completions.with_raw_response.create(model="big", messages=messages)
        answer = raw.parse()
        result["content"] = answer.choices[0].message.content
        result["model"] = answer.model
        result["failover"] = raw.headers.get("x-breakwater-failover")
    else:
        chunks = []
        stream = client.chat.completions.create(model=scenario, messages=messages, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks.append([chunk.choices[0].delta.content, round(time.monotonic() - started, 3)])
        result["chunks"] = chunks
except Exception as error:  # the scenario reports what the agent would see
    result["error"] = type(error).__name__
    result["chunks_before_error"] = locals().get("chunks", [])
result["seconds"] = round(time.monotonic() - started, 3)
print(json.dumps(result))
