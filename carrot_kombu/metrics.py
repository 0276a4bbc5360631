"""Metrics of every :class:`~carrot_kombu.ConnectionManager` of the process.

Counting is always on (a few integer additions where things happen, see
:mod:`carrot_kombu._metrics`); this module only exports the numbers:

* :func:`register`: one Prometheus collector (``prometheus_client``, the
  ``carrot_kombu[prometheus]`` extra) for every manager, present and future,
  the ``carrot+amqp://`` transport's included;
* :func:`instrument`: the same instruments through OpenTelemetry metrics
  (``carrot_kombu[opentelemetry]``);
* :func:`text`: one scrape in the Prometheus text format, without either
  package (``carrot-kombu metrics``).

Every series has the label ``manager``: the connection name given in
``client_properties`` (``connection_name``), else ``carrot_kombu pid=<pid>
#<n>`` (the n-th manager of the process).  ``docs/metrics.rst`` lists the
metrics; their names never change.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from . import _metrics
from ._metrics import CONFIRM_BUCKETS, OUTCOMES, POOL_WAIT_BUCKETS, Metrics
from .manager import _MANAGERS, ConnectionManager
from .status import ConnectionState

if TYPE_CHECKING:
    from ._core import Core

__all__ = ("Family", "collect", "instrument", "register", "text", "uninstrument", "unregister")

PREFIX = "carrot_kombu"


@dataclass(frozen=True)
class Family:
    """One metric and its samples, whatever the exporter.

    Attributes:
        name: The Prometheus name without the ``_total`` of a counter
            (``carrot_kombu_reconnects``); OpenTelemetry's is the same with
            dots after the prefix (``carrot_kombu.reconnects``).
        kind: ``"gauge"``, ``"counter"`` or ``"histogram"``.
        help: One line: what it counts.
        unit: ``"seconds"`` or ``""``.
        samples: ``(labels, value)`` per manager (and outcome); for a
            histogram the value is ``(cumulative bucket counts, sum)``, the
            buckets being :attr:`bounds` then ``+Inf``.
    """

    name: str
    kind: str
    help: str
    unit: str = ""
    bounds: tuple[float, ...] = ()
    samples: list[tuple[dict[str, str], Any]] = field(default_factory=list)

    @property
    def otel_name(self) -> str:
        return PREFIX + "." + self.name[len(PREFIX) + 1:]


#: name, kind, help, unit, bounds: the order of :func:`collect` and of the docs.
_FAMILIES: tuple[tuple[str, str, str, str, tuple[float, ...]], ...] = (
    ("carrot_kombu_connected", "gauge", "1 while the manager has a live connection, else 0", "", ()),
    ("carrot_kombu_blocked", "gauge", "1 while the broker blocks the connection (resource alarm), else 0", "", ()),
    ("carrot_kombu_degraded", "gauge",
     "Declared entities and consumers that cannot be served now (their queue or its node is gone)", "", ()),
    ("carrot_kombu_reconnects", "counter", "Connections made after a lost one (not the first of a start())", "", ()),
    ("carrot_kombu_connection_attempts", "counter", "Connection attempts started (successful or not)", "", ()),
    ("carrot_kombu_published", "counter",
     "Messages of publish()/publish_many() calls by outcome: confirmed, nacked, returned, timeout, failed", "", ()),
    ("carrot_kombu_publish_confirm_seconds", "histogram",
     "Seconds from a publish() call until the broker confirmed the message", "seconds", CONFIRM_BUCKETS),
    ("carrot_kombu_pending_confirms", "gauge",
     "Messages published and waiting for their confirm (or for a connection)", "", ()),
    ("carrot_kombu_pool_leased", "gauge", "Channels leased from the pool now", "", ()),
    ("carrot_kombu_pool_idle", "gauge", "Open channels idle in the pool now", "", ()),
    ("carrot_kombu_pool_waiting", "gauge", "open_channel() calls waiting for a free channel now", "", ()),
    ("carrot_kombu_pool_limit", "gauge", "Most channels the pool leases at once", "", ()),
    ("carrot_kombu_pool_wait_seconds", "histogram",
     "Seconds open_channel() calls that found no free channel waited for one", "seconds", POOL_WAIT_BUCKETS),
    ("carrot_kombu_consumers", "gauge", "consume() subscriptions of the manager", "", ()),
    ("carrot_kombu_delivered", "counter", "Deliveries handed to consume() callbacks", "", ()),
)

#: Every metric name as Prometheus exposes it (counters with ``_total``, histograms' series).
NAMES = tuple(
    name + "_total" if kind == "counter" else name for name, kind, _h, _u, _b in _FAMILIES
)


def _connection_name(manager: ConnectionManager) -> Optional[str]:
    settings = manager.settings
    for properties in (settings.client_properties, settings.transport_options.get("client_properties") or {}):
        name = properties.get("connection_name")
        if name:
            return str(name)
    return None


def _managers() -> list[tuple[str, "Core"]]:
    """Every manager alive, labelled (in creation order).

    A manager's label is chosen once, the first time it is exported, and
    kept for its life (a series that changed its name mid-life would break
    every ``rate()`` over it): its connection name, or ``carrot_kombu
    pid=<pid> #<n>`` without one; a name some other live manager already
    exports under gets `` #<n>`` (``n`` the manager's creation number).
    """
    found = []
    for manager in list(_MANAGERS):
        core = manager._core
        found.append((core.metrics.sequence, _connection_name(manager), core))
    found.sort(key=lambda item: item[0])
    pid = os.getpid()
    with _labels_lock:
        used = {label for _seq, _name, core in found
                for label in [_LABELS.get(core.metrics)] if label is not None and label[0] == pid}
        taken = {label for _pid, label in used}
        labelled = []
        for sequence, name, core in found:
            known = _LABELS.get(core.metrics)
            if known is None or known[0] != pid:  # new, or inherited across a fork
                base = name if name is not None else f"carrot_kombu pid={pid} #{sequence}"
                label = base
                while label in taken:
                    label = f"{label} #{sequence}"
                taken.add(label)
                known = _LABELS[core.metrics] = (pid, label)
            labelled.append((known[1], core))
    return labelled


#: The label of each manager's metrics, with the pid it was chosen in (see :func:`_managers`).
_LABELS: "weakref.WeakKeyDictionary[Metrics, tuple[int, str]]" = weakref.WeakKeyDictionary()
_labels_lock = threading.Lock()


def _label_of(metrics: Metrics) -> str:
    known = _LABELS.get(metrics)
    if known is None or known[0] != os.getpid():
        _managers()
        known = _LABELS.get(metrics)
    return known[1] if known is not None else f"carrot_kombu pid={os.getpid()} #{metrics.sequence}"


def _gauges(core: "Core") -> dict[str, float]:
    status = core.board.current
    pool = core.pool.counts()
    return {
        "carrot_kombu_connected": float(status.state is ConnectionState.CONNECTED),
        "carrot_kombu_blocked": float(status.blocked),
        "carrot_kombu_degraded": float(len(status.degraded)),
        "carrot_kombu_pending_confirms": float(core.publisher.pending_count()),
        "carrot_kombu_pool_leased": float(pool.leased),
        "carrot_kombu_pool_idle": float(pool.idle),
        "carrot_kombu_pool_waiting": float(pool.waiting),
        "carrot_kombu_pool_limit": float(pool.limit),
        "carrot_kombu_consumers": float(len(core.consumers.snapshot())),
    }


def collect() -> list[Family]:
    """One consistent-enough reading of every manager's metrics (no lock held across managers)."""
    families = {name: Family(name, kind, help_, unit, bounds) for name, kind, help_, unit, bounds in _FAMILIES}
    for label, core in _managers():
        labels = {"manager": label}
        for name, value in _gauges(core).items():
            families[name].samples.append((labels, value))
        metrics = core.metrics
        families["carrot_kombu_reconnects"].samples.append((labels, metrics.reconnects))
        families["carrot_kombu_connection_attempts"].samples.append((labels, metrics.connection_attempts))
        families["carrot_kombu_delivered"].samples.append((labels, metrics.delivered))
        published = dict(metrics.published)
        for outcome in OUTCOMES:
            families["carrot_kombu_published"].samples.append(({**labels, "outcome": outcome}, published[outcome]))
        families["carrot_kombu_publish_confirm_seconds"].samples.append((labels, metrics.confirm_seconds.cumulative()))
        families["carrot_kombu_pool_wait_seconds"].samples.append((labels, metrics.pool_wait_seconds.cumulative()))
    return list(families.values())


# -- Prometheus text, without prometheus_client ------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def text(families: Optional[list[Family]] = None) -> str:
    """Every manager's metrics in the Prometheus text format (version 0.0.4), as a scrape returns them.

    Args:
        families: What to render (default: :func:`collect` now).
    """
    lines: list[str] = []
    for family in collect() if families is None else families:
        name = family.name
        lines.append(f"# HELP {name + ('_total' if family.kind == 'counter' else '')} {family.help}")
        lines.append(f"# TYPE {name + ('_total' if family.kind == 'counter' else '')} {family.kind}")
        for labels, value in family.samples:
            if family.kind == "histogram":
                counts, total = value
                for bound, count in zip((*family.bounds, math.inf), counts):
                    lines.append(f"{name}_bucket{_labels_text({**labels, 'le': _number(bound)})} {_number(count)}")
                lines.append(f"{name}_count{_labels_text(labels)} {_number(counts[-1])}")
                lines.append(f"{name}_sum{_labels_text(labels)} {_number(total)}")
            elif family.kind == "counter":
                lines.append(f"{name}_total{_labels_text(labels)} {_number(value)}")
            else:
                lines.append(f"{name}{_labels_text(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


# -- prometheus_client -------------------------------------------------------------------------


class _Collector:
    """The one ``prometheus_client`` collector of every manager (see :func:`register`)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for family in collect():
            label_names = sorted({key for labels, _value in family.samples for key in labels}) or ["manager"]
            if family.kind == "gauge":
                metric: Any = GaugeMetricFamily(family.name, family.help, labels=label_names)
                for labels, value in family.samples:
                    metric.add_metric([labels[k] for k in label_names], value)
            elif family.kind == "counter":
                metric = CounterMetricFamily(family.name, family.help, labels=label_names)
                for labels, value in family.samples:
                    metric.add_metric([labels[k] for k in label_names], value)
            else:
                metric = HistogramMetricFamily(family.name, family.help, labels=label_names, unit="")
                for labels, (counts, total) in family.samples:
                    buckets = [(_number(bound), count) for bound, count in zip((*family.bounds, math.inf), counts)]
                    metric.add_metric([labels[k] for k in label_names], buckets, total)
            yield metric

    def describe(self) -> Iterator[Any]:
        return iter(())  # collected only when scraped (no scrape at registration)


_lock = threading.Lock()
_registered: dict[int, tuple[Any, _Collector]] = {}


def register(registry: Any = None) -> Any:
    """Export every manager's metrics to Prometheus (idempotent per registry).

    One collector serves every manager of the process, those created later
    included; each scrape reads their numbers then.

    Args:
        registry: A ``prometheus_client.CollectorRegistry`` (default: the
            global ``REGISTRY``, served by ``start_http_server``).

    Returns:
        The collector (give it to ``registry.unregister`` to stop, or call
        :func:`unregister`).

    Raises:
        ImportError: ``prometheus_client`` is not installed
            (``pip install carrot_kombu[prometheus]``).
    """
    try:
        from prometheus_client import REGISTRY
    except ImportError as exc:
        raise ImportError("carrot_kombu.metrics.register needs prometheus_client: "
                          "pip install 'carrot_kombu[prometheus]'") from exc
    registry = REGISTRY if registry is None else _checked_registry(registry)
    with _lock:
        known = _registered.get(id(registry))
        if known is not None and known[0] is registry:
            return known[1]
        collector = _Collector()
        registry.register(collector)
        _registered[id(registry)] = (registry, collector)
        return collector


def unregister(registry: Any = None) -> None:
    """Undo :func:`register` for ``registry`` (default: the global one); nothing if not registered."""
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    else:
        _checked_registry(registry)
    with _lock:
        known = _registered.pop(id(registry), None)
    if known is not None:
        registry.unregister(known[1])


def _checked_registry(registry: Any) -> Any:
    if not (callable(getattr(registry, "register", None)) and callable(getattr(registry, "unregister", None))):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, got {type(registry).__name__}")
    return registry


def _checked_provider(provider: Any) -> Any:
    if not callable(getattr(provider, "get_meter", None)):
        raise TypeError(f"meter_provider must be an OpenTelemetry MeterProvider, got {type(provider).__name__}")
    return provider


# -- OpenTelemetry -------------------------------------------------------------------------------


_instrumented: dict[int, Any] = {}


def instrument(meter_provider: Any = None) -> Any:
    """Export every manager's metrics through OpenTelemetry (idempotent per provider).

    Gauges and counters are observable instruments read at each collection;
    the two histograms record each observation as it happens (while
    instrumented: one call more per confirm and per lease).  Names are the
    Prometheus ones with dots after the prefix and without ``_total``
    (``carrot_kombu.reconnects``); attributes ``manager`` (and ``outcome``).

    Args:
        meter_provider: An OpenTelemetry ``MeterProvider`` (default: the
            global one).

    Returns:
        The ``Meter`` used.

    Raises:
        ImportError: ``opentelemetry-api`` is not installed
            (``pip install 'carrot_kombu[opentelemetry]'``).
    """
    try:
        from opentelemetry import metrics as otel
    except ImportError as exc:
        raise ImportError("carrot_kombu.metrics.instrument needs opentelemetry-api: "
                          "pip install 'carrot_kombu[opentelemetry]'") from exc
    provider = otel.get_meter_provider() if meter_provider is None else _checked_provider(meter_provider)
    with _lock:
        known = _instrumented.get(id(provider))
        if known is not None and known[0] is provider:
            return known[1]
        from ._version import __version__

        meter = provider.get_meter("carrot_kombu", __version__)
        for name, kind, help_, unit, _bounds in _FAMILIES:
            otel_name = Family(name, kind, help_).otel_name
            unit = "s" if unit == "seconds" else "1"
            if kind == "gauge":
                meter.create_observable_gauge(otel_name, [_observer(name)], unit=unit, description=help_)
            elif kind == "counter":
                meter.create_observable_counter(otel_name, [_observer(name)], unit=unit, description=help_)
            else:
                histogram = meter.create_histogram(otel_name, unit=unit, description=help_)
                _histogram_sinks.append((provider, name, histogram))
        _instrumented[id(provider)] = (provider, meter)
        _metrics.on_histogram(_record)
        return meter


#: (provider, family name, OpenTelemetry histogram) of every instrumented provider.
_histogram_sinks: list[tuple[Any, str, Any]] = []


def uninstrument(meter_provider: Any = None) -> None:
    """Stop recording histograms into ``meter_provider``'s instruments (before shutting it down).

    Its observable instruments stay with the provider (OpenTelemetry cannot
    remove them); they stop when the provider shuts down.
    """
    if meter_provider is None:
        from opentelemetry import metrics as otel

        meter_provider = otel.get_meter_provider()
    else:
        _checked_provider(meter_provider)
    with _lock:
        _instrumented.pop(id(meter_provider), None)
        _histogram_sinks[:] = [sink for sink in _histogram_sinks if sink[0] is not meter_provider]
        if not _histogram_sinks:
            _metrics.off_histogram(_record)

_HISTOGRAM_OF = {"confirm_seconds": "carrot_kombu_publish_confirm_seconds",
                 "pool_wait_seconds": "carrot_kombu_pool_wait_seconds"}


def _record(metrics: Metrics, which: str, value: float) -> None:
    family = _HISTOGRAM_OF[which]
    attributes = {"manager": _label_of(metrics)}
    for _provider, name, histogram in list(_histogram_sinks):
        if name == family:
            histogram.record(value, attributes)


def _observer(family_name: str) -> Callable[[Any], Iterable[Any]]:
    def observe(_options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        for family in collect():
            if family.name == family_name:
                return [Observation(value, labels) for labels, value in family.samples]
        return []

    return observe
