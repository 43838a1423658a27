"""What the scripts of this folder share: their arguments, clients of the
official OpenAI Python SDK set up alike, reading server-sent events from
raw lines, describing an SDK exception, and printing the one JSON object
that tests/http_api_sdk.rs reads from standard output.

Every script is run as `SCRIPT BASE_URL API_KEY PARAMS`, where BASE_URL is
`http://ADDR/v1`, API_KEY what the SDK sends as `Authorization: Bearer`,
and PARAMS a JSON object of the scenario's parameters. The scripts report
what they saw; the Rust test decides whether it is right.
"""

import json
import sys

import openai

# The HTTP client the SDK itself is built on: `httpx2` in the pinned
# version, `httpx` in older ones.
try:
    import httpx2 as httpx
except ImportError:
    import httpx

# Every request's bound, well under the Rust side's own.
TIMEOUT = 30.0


def args():
    """(base_url, api_key, params) from the command line."""
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} BASE_URL API_KEY PARAMS_JSON")
    return sys.argv[1], sys.argv[2], json.loads(sys.argv[3])


def client(base_url, api_key):
    """A synchronous client that never retries: every answer the server
    gives is the one the test sees."""
    return openai.OpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=TIMEOUT
    )


def async_client(base_url, api_key):
    """Like `client`, with asyncio."""
    return openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=TIMEOUT
    )


def user(question):
    """A message list of one user message."""
    return [{"role": "user", "content": question}]


def chorus_headers(response):
    """The headers the HTTP API adds, from an httpx response."""
    return {
        "chorus_request": response.headers.get("x-chorus-request"),
        "chorus_role": response.headers.get("x-chorus-role"),
        "status": response.status_code,
        "content_type": response.headers.get("content-type"),
    }


def local_port(response):
    """The client-side port of the connection that carried `response`, or
    None when the transport does not say."""
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    address = stream.get_extra_info("client_addr")
    return address[1] if address else None


def sse_events(lines):
    """Server-sent events from an iterator of lines (without their line
    ends): one {"id": ..., "data": ...} per event, `id` None when the event
    had no `id:` line. Comments and other fields are skipped."""
    event = {"id": None, "data": None}
    for line in lines:
        if line == "":
            if event["data"] is not None:
                yield event
            event = {"id": None, "data": None}
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "id":
            event["id"] = value
        elif field == "data":
            if event["data"] is None:
                event["data"] = value
            else:
                event["data"] += "\n" + value
    if event["data"] is not None:
        yield event


def describe_error(error):
    """What a test needs to know about an exception the SDK raised: its
    class, the SDK classes it is an instance of, the error object the
    server sent (`body`: for a status error, the `error` member of the
    response body; for an error event in a stream, its `error`) and, for a
    status error, the HTTP status and the `Retry-After` header."""
    report = {
        "raised": type(error).__name__,
        "classes": [
            cls.__name__
            for cls in type(error).__mro__
            if cls.__module__.split(".")[0] == "openai"
        ],
        "message": str(error),
        "status": None,
        "retry_after": None,
        "body": None,
    }
    if isinstance(error, openai.APIError):
        report["body"] = error.body
    if isinstance(error, openai.APIStatusError):
        report["status"] = error.status_code
        report["retry_after"] = error.response.headers.get("retry-after")
    return report


def emit(result):
    """Prints the scenario's result, the only line on standard output."""
    print(json.dumps(result), flush=True)
