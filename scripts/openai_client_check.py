"""Talk to a running `mor serve` with the official openai Python client: list models, a completion, a streamed
chat completion, and error cases. Exits non-zero on the first failed check.

Usage: python3 openai_client_check.py BASE_URL MODEL_NAME [API_KEY]
"""

import sys
import time

import openai


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    key = sys.argv[3] if len(sys.argv) > 3 else "unused"
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list().data]
    assert model in ids, ids
    print(f"models: {ids}")

    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
    text = c.choices[0].text
    print(f"completion: {text!r} (finish {c.choices[0].finish_reason}, usage {c.usage})")
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens > 0 and c.usage.prompt_tokens > 0

    start = time.time()
    first = None
    pieces = []
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish = None
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                if first is None:
                    first = time.time() - start
                pieces.append(ch.delta.content)
            if ch.finish_reason is not None:
                finish = ch.finish_reason
    streamed = "".join(pieces)
    print(f"streamed chat ({len(pieces)} chunks, first after {first:.3f} s, finish {finish}): {streamed!r}")
    assert len(pieces) > 1 and finish in ("stop", "length") and usage is not None

    whole = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=48,
        temperature=0,
    )
    assert whole.choices[0].message.content == streamed, (whole.choices[0].message.content, streamed)
    print("streamed == non-streamed")

    for bad, field in [({"max_tokens": -5}, "max_tokens"), ({"n": 2}, "n")]:
        try:
            client.completions.create(model=model, prompt="x", **bad)
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body["param"] == field, e.body
            print(f"{bad}: 400 {e.body['message']!r}")
        else:
            raise AssertionError(f"{bad} was accepted")
    try:
        client.completions.create(model=model, prompt="word " * 100_000, max_tokens=4)
    except openai.APIStatusError as e:
        assert e.status_code in (400, 413), e
        print(f"oversized prompt: {e.status_code} {e.body['message']!r}")
    else:
        raise AssertionError("an oversized prompt was accepted")
    print("openai client check: all passed")


if __name__ == "__main__":
    main()
