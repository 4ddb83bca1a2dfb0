"""The exceptions of autopause.

    AutopauseError
    ├── ConfigError          settings or arguments that cannot work; exit 2
    ├── StoreUnavailable     Postgres cannot be reached; retry later
    ├── StoreRejected        Postgres refused the data itself; retrying cannot help
    ├── BrokerUnavailable    RabbitMQ cannot be reached; retry later
    ├── NotFound             a sandbox, message or other named thing does not exist
    ├── E2BError             an operator's or reconcile's E2B call failed; ``retryable`` says
    │                        whether a later try may help
    └── ReporterError        (consumer/reporter.py, for app services)
        ├── BufferFull       too many events wait for the broker; the event was not taken
        └── Undelivered      events still unconfirmed when the reporter closed

Driver exceptions are translated at one boundary each and never reach a role:
asyncpg's in ``consumer.store.base``, aio-pika's and aiormq's in
``consumer.broker.translate``, and the E2B SDK's (``e2b.exceptions``: not
found, rate limit, authentication, timeout, the rest) plus httpx's in
``consumer.e2b_adapter``. The adapter maps the pause path's to a
``CallOutcome`` (paused, already paused, gone, retryable, failed) instead of
raising, so the worker decides from a value; only listings, metrics and
operator resumes raise :class:`E2BError`, never holding the request (and its
key) in the traceback.

Two exceptions stand outside the tree on purpose: ``retrying.Stopping``, a
role's own signal that it is shutting down mid-retry, and
``store.sql.QueryFileError``, a packaging mistake found when the SQL loads.
"""


class AutopauseError(Exception):
    """Base of every error autopause raises on purpose."""


class ConfigError(AutopauseError):
    """A setting or an argument that cannot work."""


class StoreUnavailable(AutopauseError):
    """PostgreSQL is down or unreachable; the operation may be retried."""


class StoreRejected(AutopauseError):
    """PostgreSQL refused a statement for its data (not for its own state): do not retry it as is."""


class BrokerUnavailable(AutopauseError):
    """RabbitMQ is down or unreachable; the operation may be retried."""


class NotFound(AutopauseError):
    """The named thing does not exist."""


class E2BError(AutopauseError):
    """An E2B call other than pause failed; ``retryable`` says whether a later try may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
