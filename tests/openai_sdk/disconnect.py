"""A client of the official OpenAI Python SDK that leaves in the middle of
a stream: it reads the first `read` content chunks of a streamed chat,
then closes the stream (and with it the connection) without reading the
rest, and closes the client.

PARAMS: {"model": MODEL, "question": TEXT, "read": N}
Prints: {"chorus_request", "chorus_role", "status", "text", "read"}
"""

from harness import args, chorus_headers, client, emit, user


def main():
    base_url, api_key, params = args()
    sdk = client(base_url, api_key)
    create = sdk.chat.completions.with_streaming_response.create
    with create(
        model=params["model"], messages=user(params["question"]), stream=True
    ) as response:
        report = chorus_headers(response.http_response)
        report.update(text="", read=0)
        stream = response.parse()
        for chunk in stream:
            content = "".join(c.delta.content or "" for c in chunk.choices)
            if content:
                report["text"] += content
                report["read"] += 1
            if report["read"] == params["read"]:
                break
        # Leaves with the rest of the stream unread: the connection closes.
        stream.close()
    sdk.close()
    emit(report)


if __name__ == "__main__":
    main()
