"""Chats through the official OpenAI Python SDK, one after the other on one
client (so one connection pool): streamed or not, with
`Cache-Control: no-cache` or not, with the synchronous or the asyncio
client. For each chat it reports the text, the finish reason, the usage,
the completion ids, chorus's response headers (read through
`with_raw_response` / `with_streaming_response`) and the client-side port
of the connection that carried it.

PARAMS: {"client": "sync" | "async", "model": MODEL,
         "steps": [{"question": TEXT, "stream": BOOL, "no_cache": BOOL,
                    "include_usage": BOOL} | {"models": true}, ...]}
Prints: {"steps": [REPORT, ...]}, one report per step.
"""

import asyncio

from harness import args, async_client, chorus_headers, client, emit, local_port, user


def request_options(params, step):
    """The keyword arguments of `chat.completions.create` for `step`."""
    options = {"model": params["model"], "messages": user(step["question"])}
    if step.get("no_cache"):
        options["extra_headers"] = {"Cache-Control": "no-cache"}
    if step.get("stream"):
        options["stream"] = True
        if step.get("include_usage"):
            options["stream_options"] = {"include_usage": True}
    return options


def usage_of(usage):
    return None if usage is None else usage.model_dump()


def completion_report(response, completion):
    """A non-streamed answer."""
    report = chorus_headers(response)
    choice = completion.choices[0]
    report.update(
        port=local_port(response),
        object=completion.object,
        ids=[completion.id],
        role=choice.message.role,
        text=choice.message.content,
        finish_reason=choice.finish_reason,
        usage=usage_of(completion.usage),
        choices=len(completion.choices),
    )
    return report


def stream_report(response):
    """The start of a streamed answer's report; `add_chunk` fills it."""
    report = chorus_headers(response)
    report.update(
        port=local_port(response),
        object=None,
        ids=[],
        role=None,
        deltas=[],
        text="",
        finish_reason=None,
        usage=None,
        chunks=0,
    )
    return report


def add_chunk(report, chunk):
    report["chunks"] += 1
    report["object"] = chunk.object
    if chunk.id not in report["ids"]:
        report["ids"].append(chunk.id)
    if chunk.usage is not None:
        report["usage"] = usage_of(chunk.usage)
    for choice in chunk.choices:
        if choice.delta.role is not None:
            report["role"] = choice.delta.role
        if choice.delta.content:
            report["deltas"].append(choice.delta.content)
            report["text"] += choice.delta.content
        if choice.finish_reason is not None:
            report["finish_reason"] = choice.finish_reason


def run_sync(base_url, api_key, params):
    reports = []
    with client(base_url, api_key) as sdk:
        for step in params["steps"]:
            if step.get("models"):
                reports.append({"models": [m.id for m in sdk.models.list()]})
            elif step.get("stream"):
                create = sdk.chat.completions.with_streaming_response.create
                with create(**request_options(params, step)) as response:
                    report = stream_report(response.http_response)
                    for chunk in response.parse():
                        add_chunk(report, chunk)
                reports.append(report)
            else:
                create = sdk.chat.completions.with_raw_response.create
                raw = create(**request_options(params, step))
                reports.append(completion_report(raw.http_response, raw.parse()))
    return reports


async def run_async(base_url, api_key, params):
    reports = []
    async with async_client(base_url, api_key) as sdk:
        for step in params["steps"]:
            if step.get("models"):
                models = [m.id async for m in sdk.models.list()]
                reports.append({"models": models})
            elif step.get("stream"):
                create = sdk.chat.completions.with_streaming_response.create
                async with create(**request_options(params, step)) as response:
                    report = stream_report(response.http_response)
                    async for chunk in await response.parse():
                        add_chunk(report, chunk)
                reports.append(report)
            else:
                create = sdk.chat.completions.with_raw_response.create
                raw = await create(**request_options(params, step))
                reports.append(completion_report(raw.http_response, raw.parse()))
    return reports


def main():
    base_url, api_key, params = args()
    if params["client"] == "async":
        steps = asyncio.run(run_async(base_url, api_key, params))
    else:
        steps = run_sync(base_url, api_key, params)
    emit({"steps": steps})


if __name__ == "__main__":
    main()
