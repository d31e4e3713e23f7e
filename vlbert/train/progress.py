"""Progress for long loops: a live bar on a terminal, plain lines in a log file.

Outside a terminal (a Slurm log, ``> train.log``) a bar would write a frame on
every refresh, hundreds of thousands over a long run; there ``Progress`` writes
one plain line every ``every`` updates instead (none when ``every`` is 0, for
callers that log their own line per interval, like the training loop).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: Optional[int], desc: str, initial: int = 0, every: int = 0, enabled: bool = True,
                 unit: str = "it", stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
        self.n, self._info = initial, {}
        live = enabled and self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream,
                        disable=not live)

    @property
    def live(self) -> bool:
        return not self.bar.disable

    def update(self, n: int = 1, **info: Any) -> None:
        """Advance by ``n``; ``info`` (e.g. loss=...) shows beside the bar, or on the plain line."""
        self.n += n
        self._info = info
        if self.live:
            if info:
                self.bar.set_postfix(info, refresh=False)  # drawn at the bar's own pace
            self.bar.update(n)
        elif self.enabled and self.every and self.n % self.every < n:
            self._line()

    def _line(self) -> None:
        of = f"/{self.total}" if self.total else ""
        extra = "".join(f" {k} {v}" for k, v in self._info.items())
        print(f"{self.desc} {self.n}{of}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if not self.live and self.enabled and self.every and self.n % self.every:
            self._line()  # the last, partial interval
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
