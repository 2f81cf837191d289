"""One APIRouter module per wire protocol (`openai.py`: chat completions, completions, models) plus
the service routes (`service.py`). A handler is module-level and thin: it checks, prepares its
protocol's job and hands it to the pipeline; the `Server` comes from `request.app.state`."""

from typing import Any

from jamba_server.protocol import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 499, 500, 503, 504)
}
STREAMING_OK: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}
