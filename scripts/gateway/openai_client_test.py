#!/usr/bin/env python3
"""Drives a running lmforge gateway with the official `openai` package, unchanged but for the
base URL: chat, streaming, n > 1, stop, JSON mode, structured output (`json_schema`, through the SDK's
`parse` with a pydantic model), legacy completions, and each error case
(400 naming the field, 401, 404, 429 with retry-after, 503 when inference is down).

Exit status 0 when every check passes; the failing check is printed otherwise.
Run by `services/gateway/tests/openai_sdk.rs` (make test) against an in-process stack.
"""

import argparse
import json
import sys
from typing import Literal

import openai


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--limited-key", help="a key allowed 1 request per minute")
    parser.add_argument("--down-base-url", help="a gateway whose inference is down")
    parser.add_argument("--down-api-key", help="a key of that gateway (default: --api-key)")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    results = []

    def step(name, fn):
        try:
            fn()
        except Exception as error:  # report which check failed, then fail
            print(f"FAIL {name}: {type(error).__name__}: {error}")
            sys.exit(1)
        results.append(name)
        print(f"ok   {name}")

    messages = [{"role": "user", "content": "Hi there"}]

    def models():
        ids = [m.id for m in client.models.list().data]
        check(args.model in ids, f"{args.model} not in {ids}")

    def chat():
        r = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=12, temperature=0
        )
        check(r.object == "chat.completion", r.object)
        check(len(r.choices) == 1, r.choices)
        check(isinstance(r.choices[0].message.content, str), r.choices[0].message)
        check(r.choices[0].message.role == "assistant", r.choices[0].message.role)
        check(r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
        check(r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, r.usage)
        check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)

    def stream():
        whole = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=12, temperature=0,
            extra_body={"no_cache": True},
        )
        chunks = list(
            client.chat.completions.create(
                model=args.model, messages=messages, max_tokens=12, temperature=0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"no_cache": True},
            )
        )
        check(len(chunks) >= 3, f"only {len(chunks)} chunks")
        text = "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices
        )
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        check(finish == [whole.choices[0].finish_reason], finish)
        check(text == whole.choices[0].message.content, f"{text!r} != {whole.choices[0].message.content!r}")
        check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1])

    def n_choices():
        r = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=6, n=3, temperature=0.9, seed=1
        )
        check(sorted(c.index for c in r.choices) == [0, 1, 2], r.choices)

    def stop():
        free = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=24, temperature=0,
            extra_body={"ignore_eos": True},
        ).choices[0].message.content
        check(len(free) >= 8, f"output too short to pick a stop string: {free!r}")
        marker = free[4:7]
        r = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=24, temperature=0, stop=[marker],
            extra_body={"ignore_eos": True},
        )
        check(r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
        check(r.choices[0].message.content == free[: free.find(marker)],
              f"{r.choices[0].message.content!r} vs {free!r} stop {marker!r}")

    def json_mode():
        for seed in range(3):
            r = client.chat.completions.create(
                model=args.model,
                messages=[{"role": "user", "content": "JSON please"}],
                response_format={"type": "json_object"},
                max_tokens=40, temperature=1.0, seed=seed,
            )
            value = json.loads(r.choices[0].message.content)
            check(isinstance(value, dict), f"not an object: {value!r}")
            print(f"     json mode (seed {seed}): {r.choices[0].message.content}")

    def structured_output():
        import pydantic

        # Short names: the tiny model's vocabulary is nearly bytes, and its context is 64.
        class Review(pydantic.BaseModel):
            ok: bool
            grade: Literal["A", "B"]
            n: int = pydantic.Field(ge=1, le=5)

        for seed in range(2):
            try:
                r = client.chat.completions.parse(
                    model=args.model,
                    messages=[{"role": "user", "content": "Review please"}],
                    response_format=Review,
                    max_tokens=40, temperature=1.0, seed=seed,
                )
            except openai.LengthFinishReasonError as e:
                raise AssertionError(f"cut at max_tokens: {e.completion.choices[0].message.content!r}")
            review = r.choices[0].message.parsed
            check(isinstance(review, Review), f"not parsed: {r.choices[0].message.content!r}")
            print(f"     structured (seed {seed}): {r.choices[0].message.content}")
        try:
            client.chat.completions.create(
                model=args.model, messages=messages,
                response_format={"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
            )
        except openai.BadRequestError as e:
            check(e.param == "response_format.json_schema.name", e.param)
        else:
            raise AssertionError("a bad schema name was accepted")
        # Compiled by the inference engine's grammar compiler: no value satisfies it.
        unsatisfiable = {"type": "object", "required": ["a"],
                         "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}}
        try:
            client.chat.completions.create(
                model=args.model, messages=messages,
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": unsatisfiable}},
            )
        except openai.BadRequestError as e:
            check(e.param == "response_format.json_schema", (e.param, e.message))
            print(f"     unsatisfiable schema: {e.message}")
        else:
            raise AssertionError("an unsatisfiable schema was accepted")

    def completions():
        r = client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=5, temperature=0)
        check(r.object == "text_completion", r.object)
        check(isinstance(r.choices[0].text, str), r.choices[0])
        parts = list(client.completions.create(
            model=args.model, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True,
            extra_body={"no_cache": True},
        ))
        check("".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text, parts)

    def bad_request():
        try:
            client.chat.completions.create(model=args.model, messages=messages, max_tokens=10**6)
        except openai.BadRequestError as e:
            check(e.status_code == 400 and e.param == "max_tokens", (e.status_code, e.param))
        else:
            raise AssertionError("max_tokens over the cap was accepted")
        try:
            client.chat.completions.create(model=args.model, messages=[{"role": "wizard", "content": "x"}])
        except openai.BadRequestError as e:
            check(e.param == "messages[0].role", e.param)
        else:
            raise AssertionError("an unknown role was accepted")

    def unauthorized():
        bad = openai.OpenAI(base_url=args.base_url, api_key="lmf_not_a_key", max_retries=0)
        try:
            bad.chat.completions.create(model=args.model, messages=messages)
        except openai.AuthenticationError as e:
            check(e.status_code == 401, e.status_code)
        else:
            raise AssertionError("a bad key was accepted")

    def not_found():
        try:
            client.chat.completions.create(model="no-such-model", messages=messages)
        except openai.NotFoundError as e:
            check(e.status_code == 404 and e.code == "model_not_found", (e.status_code, e.code))
        else:
            raise AssertionError("an unknown model was accepted")

    def rate_limited():
        limited = openai.OpenAI(base_url=args.base_url, api_key=args.limited_key, max_retries=0)
        limited.chat.completions.create(model=args.model, messages=messages, max_tokens=2)
        try:
            limited.chat.completions.create(model=args.model, messages=messages, max_tokens=2)
        except openai.RateLimitError as e:
            retry = int(e.response.headers.get("retry-after", "0"))
            check(e.status_code == 429 and retry >= 1, (e.status_code, retry))
        else:
            raise AssertionError("the second request within the minute was accepted")

    def unavailable():
        down = openai.OpenAI(
            base_url=args.down_base_url, api_key=args.down_api_key or args.api_key, max_retries=0
        )
        try:
            down.chat.completions.create(model=args.model, messages=messages)
        except openai.InternalServerError as e:
            check(e.status_code == 503, e.status_code)
        else:
            raise AssertionError("a gateway without inference answered")

    step("models", models)
    step("chat", chat)
    step("stream", stream)
    step("n>1", n_choices)
    step("stop", stop)
    step("json_mode", json_mode)
    step("structured output", structured_output)
    step("completions", completions)
    step("400 names the field", bad_request)
    step("401", unauthorized)
    step("404", not_found)
    if args.limited_key:
        step("429 retry-after", rate_limited)
    if args.down_base_url:
        step("503 inference down", unavailable)
    print(f"all {len(results)} checks passed")


if __name__ == "__main__":
    main()
