"""The guarded receive both ends share: no payload raises out of a ``handle``.

``Guard.receive`` decodes a payload and hands the envelope to the receiver's dispatch. Whatever goes
wrong becomes a rejection: logged at WARNING with its reason (sizes and ids, never the payload),
counted by reason code in ``Rejections``, answered with an error reply when the envelope names a
sender that may be waiting, and dropped. A ``ProtocolError`` from the decoder or a handler is such a
rejection. Any other exception is a bug: it is logged at ERROR (with its traceback the first time
that kind of exception is raised at that place), counted as ``internal``, and the receiver goes on.

Pure like its callers: it takes the time as an argument and returns the replies.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import TypeVar

from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, decode
from edge_agent.protocol.errors import ProtocolError, Rejections
from edge_agent.protocol.kinds import MessageType
from edge_agent.protocol.transfer import Outgoing, error_reply

log = logging.getLogger(__name__)
R = TypeVar("R")
__all__ = ["INTERNAL", "Guard", "Rejections", "is_address"]
INTERNAL = "internal"  # the reason code of a bug (an exception that is not a ProtocolError)
MAX_REASON_CHARS = 300  # an error reply's message and a log line's reason are cut here


class Guard:
    """Decode and dispatch one payload with every failure turned into a counted, logged rejection."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.rejections = Rejections()
        self._traced: set[tuple[str, str, int]] = set()  # (exception, file, line) already logged with a traceback

    def receive(
        self,
        topic: str,
        payload: bytes,
        now: float,
        dispatch: Callable[[Envelope], R],
        refused: Callable[[list[Outgoing]], R],
    ) -> R:
        """``dispatch(envelope)``, or ``refused(error replies)`` when the payload or its handling fails."""
        try:
            env = decode(payload)
        except ProtocolError as exc:
            self.rejections.add(exc.code)
            log.warning("dropped %d-byte message on %s: %s", len(payload), topic, _cut(str(exc)))
            return refused([])
        except Exception as exc:  # a bug in the decoder: the payload still must not stop the receiver
            self.internal(exc, f"decoding a {len(payload)}-byte message on {topic}")
            return refused([])
        try:
            return dispatch(env)
        except ProtocolError as exc:
            self.rejections.add(exc.code)
            log.warning("refused %s %s from %s: %s", env.type, env.id, env.src, _cut(str(exc)))
            return refused(self.answer(env, exc.code, exc.message, now))
        except Exception as exc:
            self.internal(exc, f"handling {env.type} {env.id} from {env.src}")
            return refused(self.answer(env, INTERNAL, f"{exc.__class__.__name__} in {self.me}", now))

    def answer(self, env: Envelope, code: str, message: str, now: float) -> list[Outgoing]:
        """The error reply to a refused envelope, if someone may wait for one: never to an error (no
        ping-pong between two receivers), to ourselves, or to a sender that is no address."""
        if env.error is not None or env.type == MessageType.ERROR or env.src == self.me or not is_address(env.src):
            return []
        return [error_reply(env, self.me, code, _cut(message), now)]

    def internal(self, exc: BaseException, doing: str) -> None:
        """A bug (also one outside ``receive``, e.g. a service carrying out an action): counted and logged
        at ERROR, with the traceback the first time this exception comes from this place."""
        self.rejections.add(INTERNAL)
        frames = traceback.extract_tb(exc.__traceback__)
        last = frames[-1] if frames else None
        where = (type(exc).__name__, last.filename if last else "", (last.lineno or 0) if last else 0)
        first = where not in self._traced
        self._traced.add(where)
        log.error("bug while %s: %s: %s (message dropped)", doing, type(exc).__name__, _cut(str(exc)),
                  exc_info=exc if first else None)  # fmt: skip


def is_address(name: str) -> bool:
    """An agent id or the coordinator: something with an inbox."""
    if name == topics.COORDINATOR:
        return True
    try:
        topics.check_id(name)
    except ValueError:
        return False
    return True


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
