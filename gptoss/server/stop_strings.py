"""The `stop` option: stop strings apply to content only.

Generation stops at the first occurrence, the text is cut before it and finish_reason is "stop". While streaming,
text that could be the start of a stop string is held back until the next text decides it.
"""

from __future__ import annotations


class StopStringMatcher:
    """Cuts content at the first stop string; holds back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Adds text; returns the part that can be released now (everything before a stop string, once hit)."""
        if not self.stops:
            return text
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.hit = self.pending[:min(found)], "", True
            return out
        keep = 0  # the longest tail of pending that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """Releases the held-back text (the content ended, so it cannot become a stop string)."""
        out, self.pending = self.pending, ""
        return out
