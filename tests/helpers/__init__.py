"""What the tests share, one module a concern; no test module imports another.

- ``config``: where the shared services are, the repository's paths, the E2B test key
- ``waiting``: wait for a condition (or a value) with a deadline, never a fixed sleep
- ``events``: valid events as a producer sends them, traffic, and the rows it must give
- ``amqp``: publishing with confirms, queue depths, dead letters, a queue that refuses
- ``database``: the rows of a test's schema, and writes that fail on purpose
- ``pipeline``: the roles run in this process: seed, ingest, tick, work
- ``processes``: autopause as a subprocess (one-shot or long-running), free ports
- ``proxies``: loopback TCP proxies that cut a link or lag its close
- ``metrics``: this process's metrics and a scraped exposition
- ``management``: RabbitMQ's management API, throwaway vhosts
- ``rabbitmq_nodes``: private RabbitMQ nodes that a test starts, kills and clusters
- ``services``: the machine's own RabbitMQ and PostgreSQL stopped and started again
- ``exclusive``: the lock that keeps other tests off the services while one stops them, and
  the guard that refuses connections to tests that must not make them
- ``hostile``: hypothesis strategies of hostile messages, each with its expected reason
- ``compose``: the compose files as YAML, and their two forms of variables
- ``monitoring``: the shipped rules and dashboard, and the Prometheus tools
"""
