"""Identical streamed chats at the same time through the asyncio client of
the official OpenAI Python SDK: all are started together
(`asyncio.gather`) and each is read to its end. Reports every text with
chorus's role and request headers, so the test can check that they were
one generation.

PARAMS: {"model": MODEL, "question": TEXT, "count": N}
Prints: {"answers": [{"chorus_role", "chorus_request", "status", "ids",
                      "text", "finish_reason"}, ...]}, in start order.
"""

import asyncio

from harness import args, async_client, chorus_headers, emit, user


async def one_stream(sdk, params):
    create = sdk.chat.completions.with_streaming_response.create
    async with create(
        model=params["model"], messages=user(params["question"]), stream=True
    ) as response:
        answer = chorus_headers(response.http_response)
        answer.update(ids=[], text="", finish_reason=None)
        async for chunk in await response.parse():
            if chunk.id not in answer["ids"]:
                answer["ids"].append(chunk.id)
            for choice in chunk.choices:
                answer["text"] += choice.delta.content or ""
                if choice.finish_reason is not None:
                    answer["finish_reason"] = choice.finish_reason
    return answer


async def run(base_url, api_key, params):
    async with async_client(base_url, api_key) as sdk:
        streams = [one_stream(sdk, params) for _ in range(params["count"])]
        return await asyncio.gather(*streams)


def main():
    base_url, api_key, params = args()
    emit({"answers": asyncio.run(run(base_url, api_key, params))})


if __name__ == "__main__":
    main()
