"""A message between admission and its confirm, and the error its caller gets.

Shared by :mod:`carrot_kombu.publisher` (the blocking path) and
:mod:`carrot_kombu._submission` (the non-waiting one): both settle the same
``_Pending`` records and report them the same way, so ``publish_async`` and
``publish`` raise the very same errors.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from ._deadline import Deadline
from ._link import Outbound, Waiter
from ._metrics import now
from .exceptions import (
    Blocked,
    Disconnected,
    Nacked,
    OutcomeUnknown,
    PublishTimeout,
    Rejected,
    Unroutable,
)

# RabbitMQ quotes names without escaping them: the greedy match takes the
# last "' in vhost '", and a name it cannot pin down falls to the careful path.
_NO_EXCHANGE = re.compile(r"exchange '(.*)' in vhost '")
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
_USER_ID = re.compile(r"user_id property set to '(.*)' but authenticated user")


class _Pending(Waiter):
    """One message between admission and its confirm; encoded once, framed per channel.

    ``on_done(pending)`` (the completion hook of :class:`Submission`) runs
    once, from :meth:`wake`, after ``outcome`` is set: every settlement
    sets the outcome, then wakes, under the publisher's lock.
    """

    __slots__ = ("id", "message", "outcome", "detail", "error", "written", "tag", "settled_at", "republish",
                 "on_done", "forgotten")

    def __init__(self, pid: int, message: Outbound, republish: bool = True) -> None:
        super().__init__()
        self.id = pid
        self.message = message
        # "ack", "nack", "returned", "rejected", "aborted", "blocked", "failed", "unknown"
        self.outcome: Optional[str] = None
        self.detail = ""
        self.error: Optional[BaseException] = None
        self.written = False
        self.tag = 0
        self.settled_at = 0.0  # when the broker's confirm was read (for the confirm latency)
        #: False: at most once; written, then its channel lost: settled "unknown", never written again.
        self.republish = republish
        self.on_done: Optional[Callable[["_Pending"], None]] = None
        #: Its caller is gone (cancelled, timed out): never admitted or written
        #: from now on.  Set and read under the publisher's lock.
        self.forgotten = False

    def ready(self) -> bool:
        return self.outcome is not None

    def wake(self) -> None:
        super().wake()
        done = self.on_done
        if done is not None and self.outcome is not None:
            self.on_done = None
            done(self)


#: One message's fate, as reported to ``publish_many(report=...)``: the error
#: the blocking call raises for it (None: confirmed) and when it settled
#: (``time.monotonic()``; None if it never did).
Outcome = tuple[Optional[BaseException], Optional[float]]


def _outcomes(encoded: list[_Pending], batch: list[_Pending], deadline: Deadline, missing: str) -> list[Outcome]:
    """Each encoded message's outcome; one never admitted (the batch failed first) reports that error."""
    total = len(encoded)
    admitted = {id(pending) for pending in batch}
    found: list[Outcome] = []
    for index, pending in enumerate(encoded):
        if pending.outcome is None:
            error: Optional[BaseException] = (
                _timeout_error(pending, deadline, index, total, missing) if id(pending) in admitted
                else Disconnected(f"the batch failed before this message was sent (message {index} of {total})"))
            found.append((error, None))
            continue
        try:
            _raise_for(pending, index, total)
            found.append((None, pending.settled_at or now()))
        except Exception as exc:  # noqa: BLE001 - reported, as the blocking call raises it
            found.append((exc, pending.settled_at or now()))
    return found


def _first_error(pendings: list[_Pending]) -> Optional[BaseException]:
    total = len(pendings)
    for index, pending in enumerate(pendings):
        try:
            _raise_for(pending, index, total)
        except Exception as exc:  # noqa: BLE001 - handed to the caller as the blocking call raises it
            return exc
    return None


def _timeout_error(pending: _Pending, deadline: Deadline, index: int, total: int, missing: str) -> PublishTimeout:
    return PublishTimeout(
        f"no confirm from the broker within {deadline.timeout}s"
        + ("; the message was written and may have been stored" if pending.written
           else f"; the message was never sent ({missing})")
        + (f" (message {index} of {total})" if total > 1 else ""),
        outcome="unknown" if pending.written else "not_sent",
    )


def _culprits(error: BaseException, unsettled: list[_Pending]) -> list[_Pending]:
    """Which in-flight messages the broker's channel error is about.

    The broker processes a channel's publishes in order and names what it
    refused: an exchange (404, 403), a size (406), a user_id (403).  When
    the text names nothing we recognise (or nothing in flight matches it),
    nobody is blamed here: the messages are published again one at a time
    (see :meth:`Publisher.attach`), so that the refusal, if it comes again,
    falls on exactly one.
    """
    if not unsettled:
        return []
    if len(unsettled) == 1:
        return unsettled  # alone on the channel: it is the one
    text = str(getattr(error, "reply_text", "") or error)
    found = _NO_EXCHANGE.search(text)
    if found:
        name = found.group(1)
        name = "" if name == "amq.default" else name  # how RabbitMQ names the default exchange
        return [p for p in unsettled if p.message.exchange == name]
    found = _TOO_LARGE.search(text)
    if found:
        limit = int(found.group(2))
        return [p for p in unsettled if len(p.message.body) > limit]
    found = _USER_ID.search(text)
    if found:
        return [p for p in unsettled if p.message.user_id == found.group(1)]
    return []


def _raise_for(pending: _Pending, index: int, total: int) -> None:
    which = f" (message {index} of {total})" if total > 1 else ""
    if pending.outcome == "aborted":
        written = "; it was written and may have been stored" if pending.written else "; it was never sent"
        raise Disconnected(f"{pending.detail} before the broker confirmed the message{which}{written}",
                           pending.error)
    if pending.outcome == "blocked":
        written = "; the message was written and may have been stored" if pending.written else \
            "; the message was never sent"
        raise Blocked(f"{pending.error}{written}{which}")
    if pending.outcome == "nack":
        raise Nacked(f"the broker refused the message (basic.nack){which}")
    if pending.outcome == "returned":
        raise Unroutable(f"unroutable mandatory message{which}: {pending.detail}")
    if pending.outcome == "unknown":
        raise OutcomeUnknown(
            f"{pending.detail} after the message was written and before the broker confirmed it{which}; "
            "it may or may not have been stored, and is not published again (republish=False)"
        )
    if pending.outcome == "failed":
        assert pending.error is not None
        raise pending.error
    if pending.outcome == "rejected":
        error = pending.error
        code = int(getattr(error, "reply_code", 0) or 0)
        text = str(getattr(error, "reply_text", "") or error)
        raise Rejected(f"the broker refused the message{which}: ({code}) {text}", error, code, text)
