"""Reconnecting to a stream through chorus's extension
`GET /v1/chorus/streams/{request}`: a client of the official OpenAI Python
SDK reads the first `read` token events of a streamed chat as raw
server-sent events (to see their `id:` lines), then closes the stream;
then the HTTP client the SDK is built on asks for the rest of the same
request with `Last-Event-ID` set to the last id it read, and reads it to
its end.

PARAMS: {"model": MODEL, "question": TEXT, "read": N}
Prints: {"first": HEADERS, "resumed": HEADERS, "last_event_id": ID,
         "before": [EVENT, ...], "after": [EVENT, ...]}
where EVENT is {"id": ID or null, "content", "finish_reason", "chunk_id"}
for a chunk, {"done": true} for `[DONE]` and {"error": {...}} for an error.
"""

import json

from harness import TIMEOUT, args, chorus_headers, client, emit, httpx, sse_events, user


def describe(event):
    if event["data"] == "[DONE]":
        return {"done": True}
    data = json.loads(event["data"])
    if "error" in data:
        return {"error": data["error"]}
    choices = data.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return {
        "id": event["id"],
        "content": delta.get("content"),
        "finish_reason": choices[0].get("finish_reason"),
        "chunk_id": data.get("id"),
    }


def read_first(base_url, api_key, params):
    """The first `read` token events (those with an id), and the events
    before them."""
    events = []
    with client(base_url, api_key) as sdk:
        create = sdk.chat.completions.with_streaming_response.create
        with create(
            model=params["model"], messages=user(params["question"]), stream=True
        ) as response:
            headers = chorus_headers(response.http_response)
            tokens = 0
            for event in sse_events(response.iter_lines()):
                events.append(describe(event))
                tokens += event["id"] is not None
                if tokens == params["read"]:
                    break
    return headers, events


def read_rest(base_url, api_key, request, last_event_id):
    headers = {"Authorization": f"Bearer {api_key}", "Last-Event-ID": last_event_id}
    url = f"{base_url}/chorus/streams/{request}"
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as http:
        with http.stream("GET", url, headers=headers) as response:
            resumed = chorus_headers(response)
            if response.status_code != 200:
                response.read()
                resumed["body"] = response.text
                return resumed, []
            return resumed, [describe(e) for e in sse_events(response.iter_lines())]


def main():
    base_url, api_key, params = args()
    first, before = read_first(base_url, api_key, params)
    ids = [e["id"] for e in before if e.get("id") is not None]
    report = {"first": first, "before": before, "last_event_id": None, "after": []}
    if first["chorus_request"] and ids:
        report["last_event_id"] = ids[-1]
        report["resumed"], report["after"] = read_rest(
            base_url, api_key, first["chorus_request"], ids[-1]
        )
    emit(report)


if __name__ == "__main__":
    main()
