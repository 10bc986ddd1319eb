"""How an MCP tool call ended, and what it is charged: one reading for client and server.

    outcome = result_outcome(result)        # a CallToolResult, InputRequiredResult, ...
    outcome = error_outcome(exc)            # what call_tool raised
    outcome.charged, outcome.error_type     # -> ToolCall.finish / fail

The rules, in the order a hostile agent would probe them:

* a ``CallToolResult`` is charged its price (the price book's ``tools=`` entry, whose function
  gets the ``CallToolResult``), also with ``isError=true``: the server ran the tool, and a
  paid API it called failing is still paid for. The span is then ``ERROR`` with
  ``error.type=tool_error``, as the MCP semantic conventions say; a price function that
  should not charge failures returns 0 for ``result.isError``;
* an ``InputRequiredResult`` (the 2026-07-28 protocol's "ask the user, then call again") is
  charged nothing: the tool has not finished, and the call that carries the answers is the
  one charged;
* a JSON-RPC error answered by the server (unknown method, invalid parameters, ...) means
  the tool did not run: the reservation is released, ``error.type`` is the error code
  (``-32602``) and ``rpc.response.status_code`` too;
* anything else (a timeout, a closed connection, a cancelled task, a result the client could
  not parse) may have happened after the tool ran: charged what was reserved, never free, so
  an agent that times out every call still runs out of budget.
"""

from __future__ import annotations

from typing import Any

#: MCP / JSON-RPC semantic-convention attributes (semantic-conventions-genai ``mcp.md``).
MCP_METHOD_NAME = "mcp.method.name"
MCP_PROTOCOL_VERSION = "mcp.protocol.version"
MCP_SESSION_ID = "mcp.session.id"
RPC_RESPONSE_STATUS_CODE = "rpc.response.status_code"
METHOD_TOOLS_CALL = "tools/call"
TOOL_ERROR = "tool_error"
#: ``params._meta`` key carrying the client's call token (128 random bits, hex), so that an
#: instrumented server in the same process, or on the same ledger, does not charge the call
#: again (``call_token``, ``server``).
CALL_META_KEY = "io.github.otel-budget/call"

# Error codes the *client* raises without an answer from the server (the request may have
# been served): the SDK's CONNECTION_CLOSED and REQUEST_TIMEOUT (mcp 2), and the HTTP 408
# that mcp 1 uses for a read timeout.
_LOCAL_CODES = frozenset({-32000, -32001, 408})


class Outcome:
    """``charge``: "price" (its price, from the result), "none" (released), "reserved" (what
    was reserved); ``error_type`` / ``message``: the span's error, if any; ``status_code``:
    the JSON-RPC error code, if any."""

    __slots__ = ("charge", "error_type", "message", "status_code")

    def __init__(
        self, charge: str, error_type: str | None = None, message: str = "",
        status_code: str | None = None,
    ) -> None:  # fmt: skip
        self.charge = charge
        self.error_type = error_type
        self.message = message
        self.status_code = status_code


PRICE = "price"
NONE = "none"
RESERVED = "reserved"
_SUCCESS = Outcome(PRICE)
_NOT_FINISHED = Outcome(NONE)


def _is_error(result: Any) -> bool:
    value = getattr(result, "isError", None)
    if value is None:
        value = getattr(result, "is_error", None)
    if value is None and isinstance(result, dict):
        value = result.get("isError")
    return value is True


def result_outcome(result: Any) -> Outcome:
    """What a value returned by ``call_tool`` means for the charge and the span."""
    if type(result).__name__ == "InputRequiredResult":
        return _NOT_FINISHED
    if _is_error(result):
        return Outcome(PRICE, TOOL_ERROR, "the tool reported an error (isError)")
    return _SUCCESS


def rpc_code(exc: BaseException) -> int | None:
    """The JSON-RPC error code an ``MCPError`` (``McpError`` in mcp 1) carries."""
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    return code if type(code) is int else None


def error_outcome(exc: BaseException) -> Outcome:
    """What an exception out of ``call_tool`` means for the charge and the span."""
    code = rpc_code(exc)
    if code is None or code in _LOCAL_CODES:
        return Outcome(RESERVED)  # error.type: the exception's own (ToolCall.fail records it)
    message = getattr(getattr(exc, "error", None), "message", None)
    return Outcome(NONE, str(code), message if isinstance(message, str) else "", str(code))


class RecordedError(Exception):
    """What the span records for an outcome whose ``error.type`` is not an exception's class
    name (``tool_error``, a JSON-RPC code): ``ToolCall.fail`` reads ``_gen_ai_error_type``."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self._gen_ai_error_type = error_type


__all__ = [
    "CALL_META_KEY",
    "MCP_METHOD_NAME",
    "MCP_PROTOCOL_VERSION",
    "MCP_SESSION_ID",
    "METHOD_TOOLS_CALL",
    "NONE",
    "PRICE",
    "RESERVED",
    "RPC_RESPONSE_STATUS_CODE",
    "TOOL_ERROR",
    "Outcome",
    "RecordedError",
    "error_outcome",
    "result_outcome",
    "rpc_code",
]
