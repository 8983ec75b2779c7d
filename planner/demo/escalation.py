"""checkEscalationNeeded, the Python half of the `escalation` flow.

The database half reads the instance's settings and the user's last five interactions
together; this function only decides, so it is easy to test on its own.
"""

from __future__ import annotations

import itertools
from typing import Any

REPEATS_TO_ESCALATE = 3


async def needs_escalation(settings: dict[str, Any], interactions: list[dict[str, Any]], message: str) -> dict[str, Any]:
    """Decide whether a human should take over, and say why.

    Rules, in order: a configured keyword in the message; the user sending the same message
    `REPEATS_TO_ESCALATE` times in a row (counting this one); at least `escalation_threshold`
    of the recent interactions unresolved or negative.

    >>> import asyncio
    >>> asyncio.run(needs_escalation({"escalation_keywords": ["agent"], "escalation_threshold": 3}, [], "an AGENT please"))
    {'escalate': True, 'reason': 'keyword: agent'}
    """
    text = message.casefold()
    for keyword in settings.get("escalation_keywords") or []:
        if keyword and keyword.casefold() in text:
            return {"escalate": True, "reason": f"keyword: {keyword}"}
    recent = [str(i.get("user_message", "")).casefold().strip() for i in interactions]
    repeats = 1 + sum(1 for _ in itertools.takewhile(lambda m: m == text.strip(), recent))
    if repeats >= REPEATS_TO_ESCALATE:
        return {"escalate": True, "reason": f"repeated message ({repeats} times)"}
    troubled = sum(1 for i in interactions if _troubled(i.get("metadata") or {}))
    threshold = int(settings.get("escalation_threshold") or 0)
    if threshold and troubled >= threshold:
        return {"escalate": True, "reason": f"{troubled} troubled interactions (threshold {threshold})"}
    return {"escalate": False, "reason": None}


def _troubled(metadata: dict[str, Any]) -> bool:
    return metadata.get("sentiment") == "negative" or metadata.get("resolved") is False
