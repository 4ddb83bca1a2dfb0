"""The exceptions of autopause.

    AutopauseError
    ├── ConfigError          settings or arguments that cannot work; exit 2
    ├── StoreUnavailable     Postgres cannot be reached; retry later
    ├── StoreRejected        Postgres refused the data itself; retrying cannot help
    ├── BrokerUnavailable    RabbitMQ cannot be reached; retry later
    └── NotFound             a sandbox, message or other named thing does not exist

Driver exceptions (asyncpg, aiormq) are translated into these at the boundary
of the store and the broker modules.
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
