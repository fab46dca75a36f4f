"""Beat's scheduler: every node may run beat, but only the holder of the appliance's beat lease sends due jobs.

Checkpoints, attestations and roll-ups must not run once per box. Each beat keeps its schedule as usual and, at
least every third of the lease, takes or renews the lease (one conditional update, appliance.actions); the
others let their entries pass unsent. When the holder dies its lease expires and the next beat to ask takes it.
"""
import logging
import os
import time

from celery.beat import PersistentScheduler
from django.conf import settings

log = logging.getLogger(__name__)
BEAT_LEASE = "beat"


class LeaderScheduler(PersistentScheduler):
    """A PersistentScheduler that sends due entries only while this process holds the beat lease."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # One holder per process: a second beat started on the same node by mistake is a contender too.
        self.holder = f"{settings.APPLIANCE_NODE}:{os.getpid()}"
        self.leading = False
        self._asked_at: float | None = None

    def ask_for_lease(self) -> bool:
        """Take or renew the beat lease when a third of it has passed since the last time; return whether held."""
        now = time.monotonic()
        if self._asked_at is not None and now - self._asked_at < settings.BEAT_LEASE_S / 3:
            return self.leading
        import django
        from django.apps import apps
        from django.db import close_old_connections

        if not apps.ready:
            django.setup()
        from . import actions

        close_old_connections()
        try:
            leading = actions.do_take_lease(BEAT_LEASE, holder=self.holder, ttl_s=settings.BEAT_LEASE_S)
        except Exception:
            log.exception("could not ask for the beat lease; sending nothing until it is held")
            leading = False
        if leading != self.leading:
            log.info("beat %s %s the beat lease", self.holder, "holds" if leading else "no longer holds")
        self.leading, self._asked_at = leading, now
        return leading

    def tick(self, *args, **kwargs):
        """Ask for the lease (beat_max_loop_interval keeps ticks closer than a third of it), then tick as usual."""
        self.ask_for_lease()
        return super().tick(*args, **kwargs)

    def apply_entry(self, entry, producer=None):
        """Send a due entry only while holding the lease; otherwise let it pass, as the holder sends it."""
        if self.leading:
            super().apply_entry(entry, producer=producer)
        else:
            log.debug("not sending %s: another beat holds the lease", entry.name)

    def close(self):
        """Let the lease go when beat stops cleanly, so another node's beat takes over at its next ask."""
        if self.leading:
            from . import actions

            try:
                actions.do_release_lease(BEAT_LEASE, holder=self.holder)
            except Exception:
                log.exception("could not release the beat lease; it expires on its own")
            self.leading = False
        super().close()
