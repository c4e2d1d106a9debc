"""What the daemon says of itself: the snapshot the metrics' gauges read at
scrape time, the blocked list's size, and the words `pcc.py --health` asks the
policy port for (name=value, the monitoring-plugin conventions are health.py's).
"""
from __future__ import annotations

from typing import Optional

from sqlalchemy import exc as sa_exc

from .board import HEALTH, WorkerBoard, combined_health
from .common import first_line, log
from .protocol import HEALTH_REQUEST
from .service import PolicyService


class SelfReport:
    """Reads the service's parts as they are now (a reload replaces some);
    `ports`: the open ports, for their connections' states."""

    def __init__(self, service: PolicyService, ports: tuple = ()):
        self.service = service
        self.ports = ports
        # Several worker processes ([server] processes): --health speaks for all of them.
        self.board: Optional[WorkerBoard] = None

    def state(self) -> dict:
        """A snapshot for the metrics and --health: the outage, what waits for
        the database, what was asked of it, the GeoIP data in use."""
        service, database = self.service, self.service.database
        unsent, waited = service.responder.notifier.backlog()
        return dict(database.outage.snapshot(), spooled_blocks=database.journal.blocks_waiting(),
                    clock_offset=database.clock.offset,
                    unwritten_sightings=database.sightings.waiting(), operations=database.store.operation_counts(),
                    geoip_built=service.geoip.built, unsent_notifications=unsent, oldest_unsent_seconds=waited,
                    connections={port.port_name: port.connection_states() for port in self.ports},
                    webhooks_waiting=service.responder.webhooks.waiting(),
                    network_lists=service.networks.state(), volume_sharing=self.volume_sharing())

    def volume_sharing(self) -> str:
        """off ([limits] off everywhere), ok, or failing (each daemon limits on its own counts)."""
        database = self.service.database
        if not database.rules.limits_anywhere(self.service.settings):
            return "off"
        return "failing" if database.volume.failing else "ok"

    def count_blocked(self) -> Optional[dict]:
        """The blocked list's size by mode, or None when the database cannot say."""
        try:
            return self.service.database.store.count_blocked()
        except sa_exc.SQLAlchemyError as error:
            self.service.metrics.database_failed()
            log.warning("metrics: cannot count blocked accounts: %s", first_line(error))
            return None

    def health_report(self) -> str:
        """What `pcc.py --health` asks the running daemon: name=value words,
        of every worker process when there are several."""
        if self.board is None:
            return self.own_health_report()
        return combined_health([(index, report and report.get("health"))
                                for index, report in self.board.gather(HEALTH)])

    def own_health_report(self) -> str:
        """This process's --health words."""
        service, database = self.service, self.service.database
        state = database.outage.snapshot()
        unsent, waited = service.responder.notifier.backlog()
        built = service.geoip.built.isoformat() if service.geoip.built else "unknown"
        return (f"{HEALTH_REQUEST} database={'failing' if state['failing'] else 'ok'} "
                f"failing_seconds={state['failing_seconds']:.0f} error_answers={state['error_answers']} "
                f"spooled_blocks={database.journal.blocks_waiting()} unsent_notices={unsent} "
                f"oldest_unsent_seconds={waited:.0f} geoip_built={built} volume_sharing={self.volume_sharing()}"
                f"{self._lists_report()}")

    def _lists_report(self) -> str:
        """ lists=tor:1342:0.40:ok,vpn:off:-:ok,hosting:120:3.00:refused (label:entries:age in
        days:the file on disk, ok or refused or gone) for --health."""
        state = self.service.networks.state()
        if not state:
            return ""
        return " lists=" + ",".join(
            f"{label}:{'off' if entries is None else entries}:{'-' if age is None else f'{age:.2f}'}:{problem or 'ok'}"
            for label, (entries, age, _most, problem) in state.items())
