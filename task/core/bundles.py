"""One message per node and phase: the clients a SuperNode hosts travel together.

In a deployment a SuperNode often serves several clients (``partition-id=p num-partitions=P``
serves every c with c % P == p). Sent one message per client, every message pays Flower's
per-message cost on its own: a task for the SuperNode to acquire, its objects pulled from
the SuperLink one message at a time, a reply pushed back; measured on the namespace
deployment, most of a message's wall time (bench/deployment.py). A bundle carries the
per-client messages of one node and one phase as one message, and the ClientApp answers with
one bundled reply; an array record sent to several of its clients (the global model) is one
object in it, which Flower's object store transfers once.

    bundle:  RecordDict {"bundle": {"size": n}, "<i>:<key>": record of message i, ...}
    reply:   RecordDict {"bundle": {"size": n}, "<i>:<key>": record of reply i,
                         "<i>:error": {"code", "reason"} where client i's handler raised}

The engine unbundles replies into one reply per client (task/engine/exchange.py), so
validation, the threat model and aggregation see what they saw before; a client that raises
inside a bundle becomes that client's error reply, as a ClientApp exception is otherwise.
Where every node hosts one client (pflower-sim's simulation: one SuperNode per client) no
message is bundled. ``node_messages=per_client`` turns bundling off.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

BUNDLE = "bundle"
SEP = ":"
ERROR = "error"

Handler = Callable[[Message, Context], Message]


def is_bundle(msg: Message) -> bool:
    return not msg.has_error() and BUNDLE in msg.content.config_records


def _pack(contents: list[RecordDict | None], errors: dict[int, Error] | None = None) -> RecordDict:
    packed = RecordDict({BUNDLE: ConfigRecord({"size": len(contents)})})
    for i, content in enumerate(contents):
        for key, record in (content or {}).items():
            packed[f"{i}{SEP}{key}"] = record
    for i, err in (errors or {}).items():
        packed[f"{i}{SEP}{ERROR}"] = ConfigRecord({"code": int(err.code), "reason": str(err.reason or "")})
    return packed


def _unpack(content: RecordDict) -> list[RecordDict]:
    size = int(content.config_records[BUNDLE]["size"])
    parts = [RecordDict() for _ in range(size)]
    for key, record in content.items():
        if key == BUNDLE:
            continue
        index, _, name = key.partition(SEP)
        parts[int(index)][name] = record
    return parts


def _error_of(part: RecordDict) -> Error | None:
    if ERROR not in part.config_records:
        return None
    err = part.config_records[ERROR]
    return Error(code=int(err["code"]), reason=str(err["reason"]))


# --- the server's side --------------------------------------------------------------------------
def bundle(messages: list[Message]) -> Message:
    """The messages (one node, one message type) as one message to that node."""
    first = messages[0].metadata
    return Message(_pack([m.content for m in messages]), dst_node_id=first.dst_node_id,
                   message_type=first.message_type)


def unbundle(sent: Message, reply: Message, messages: list[Message]) -> list[tuple[Message, Message]]:
    """Per client, (its message, its reply) out of the bundle ``sent`` and its ``reply``.

    Each client's message gets an id of its own (the bundle's, with its index) that its reply
    answers; a reply that is an error (the node failed, or the SuperLink answers for a node
    it finds gone) is every client's error, from whoever sent it.
    """
    parts = None if reply.has_error() else _unpack(reply.content)
    pairs = []
    for i, msg in enumerate(messages):
        msg.metadata.__dict__["_message_id"] = f"{sent.metadata.message_id}{SEP}{i}"
        if parts is None:
            answer = Message(reply.error, reply_to=msg)
        elif (err := _error_of(parts[i])) is not None:
            answer = Message(err, reply_to=msg)
        else:
            answer = Message(parts[i], reply_to=msg)
        answer.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
        pairs.append((msg, answer))
    return pairs


# --- the ClientApp's side -----------------------------------------------------------------------
def serve_bundles(handler: Handler) -> Handler:
    """``handler``, which also answers a bundle: each client's part in turn, one bundled reply."""

    def serve(msg: Message, context: Context) -> Message:
        if not is_bundle(msg):
            return handler(msg, context)
        contents: list[RecordDict | None] = []
        errors: dict[int, Error] = {}
        for i, part in enumerate(_unpack(msg.content)):
            # The bundle's metadata, not a new message's: a ClientApp has no TaskIdentity of the
            # run to make one with (in a Ray actor it is unset).
            one = Message(metadata=copy.copy(msg.metadata), content=part)  # type: ignore[call-overload]
            try:
                contents.append(handler(one, context).content)
            except Exception as err:  # noqa: BLE001 - as Flower answers a raising ClientApp
                contents.append(None)
                errors[i] = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}")
        return Message(_pack(contents, errors), reply_to=msg)

    serve.__name__, serve.__doc__ = handler.__name__, handler.__doc__
    return serve
