"""Requests the server should refuse or break off, made through the
official OpenAI Python SDK: for each case, which of the SDK's exception
classes it raised, with the HTTP status, the `Retry-After` header and the
error body. A case that raises nothing reports `"raised": null`.

Cases:
- `chat`, `stream`: a plain chat, not streamed / streamed and read to its
  end (to be refused for the server's own reasons: a wrong key, overload);
- `n`: `n=2`; `tools`: a client-supplied tool; `image`: an image content
  part; `oversize`: a message of `oversize_bytes` characters;
- `unknown_endpoint`: `POST /v1/embeddings`, which chorus does not serve;
- `stream_unknown`: `GET /v1/chorus/streams/r-unknown` through the SDK's
  own `get`;
- `raw_stream_unknown`: the same through the HTTP client the SDK is built
  on, without the SDK: reports the status and the body;
- `broken_stream`: the same as `stream`, for a stream that breaks off
  after it began. Both report the text read before any error.

PARAMS: {"model": MODEL, "question": TEXT, "cases": [CASE, ...],
         "oversize_bytes": N}
Prints: {CASE: {"raised", "classes", "status", "retry_after", "body",
                "message", ...}, ...}
"""

from harness import args, client, describe_error, emit, httpx, user, TIMEOUT

# A one-pixel PNG, as an image content part carries it.
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}


def chat(sdk, params, **extra):
    options = {"model": params["model"], "messages": user(params["question"])}
    options.update(extra)
    return sdk.chat.completions.create(**options)


def read_stream(sdk, params, report):
    """Streams a chat and reads it to its end, keeping the text in
    `report` as it arrives (an exception leaves what came before it)."""
    report["text"] = ""
    for chunk in chat(sdk, params, stream=True):
        for choice in chunk.choices:
            report["text"] += choice.delta.content or ""


def raw_get(base_url, api_key, path):
    """`GET base_url + path` without the SDK."""
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as http:
        response = http.get(
            base_url + path, headers={"Authorization": f"Bearer {api_key}"}
        )
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return {"raised": None, "status": response.status_code, "body": body}


def run_case(sdk, base_url, api_key, params, case):
    report = {"raised": None}
    try:
        if case == "chat":
            chat(sdk, params)
        elif case == "stream":
            read_stream(sdk, params, report)
        elif case == "n":
            chat(sdk, params, n=2)
        elif case == "tools":
            chat(sdk, params, tools=[CALCULATOR])
        elif case == "image":
            parts = [
                {"type": "text", "text": params["question"]},
                {"type": "image_url", "image_url": {"url": PIXEL}},
            ]
            messages = [{"role": "user", "content": parts}]
            sdk.chat.completions.create(model=params["model"], messages=messages)
        elif case == "oversize":
            big = "x" * params["oversize_bytes"]
            sdk.chat.completions.create(model=params["model"], messages=user(big))
        elif case == "unknown_endpoint":
            sdk.embeddings.create(model=params["model"], input="embed me")
        elif case == "stream_unknown":
            sdk.get("/chorus/streams/r-unknown", cast_to=object)
        elif case == "raw_stream_unknown":
            return raw_get(base_url, api_key, "/chorus/streams/r-unknown")
        elif case == "broken_stream":
            read_stream(sdk, params, report)
        else:
            raise SystemExit(f"unknown case {case!r}")
    except Exception as error:  # every SDK error is reported, not raised
        report.update(describe_error(error))
    return report


def main():
    base_url, api_key, params = args()
    with client(base_url, api_key) as sdk:
        reports = {
            case: run_case(sdk, base_url, api_key, params, case)
            for case in params["cases"]
        }
    emit(reports)


if __name__ == "__main__":
    main()
