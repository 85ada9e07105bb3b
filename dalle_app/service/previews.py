"""How often a request decodes a live preview of its partial images."""

from __future__ import annotations


class PreviewThrottle:
    """Keeps live previews to at most `share` of a request's time: the next preview is due once `cost / share`
    seconds have passed since the last one began, `cost` being what the last one took. A large VAE (the built-in
    model's decodes four 128 px images in 0.19 s on two CPU cores) then previews less often instead of slowing the
    request down."""

    def __init__(self, share: float = 0.2):
        self.share, self.cost, self.last = share, 0.0, None

    def due(self, now: float) -> bool:
        """Whether to decode a preview at `now`, the seconds since generation began (a clock that restarts, as on
        a retry in smaller chunks, starts afresh)."""
        if self.last is None or now < self.last or now - self.last >= self.cost / self.share:
            self.last = now
            return True
        return False

    def spent(self, seconds: float) -> None:
        """Record what the preview that was just due took."""
        self.cost = seconds
