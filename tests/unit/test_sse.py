import json

from jamba_server.lifecycle import sse


def test_sse_event_is_one_line_whatever_the_content():
    payload = json.dumps({"content": "a\u2028b\u2029c\x85d\ne"}, ensure_ascii=False)
    event = sse(payload).decode()
    assert event.endswith("\n\n")
    line = event[:-2]
    assert line.splitlines() == [line]
    assert json.loads(line.removeprefix("data: "))["content"] == "a\u2028b\u2029c\x85d\ne"
