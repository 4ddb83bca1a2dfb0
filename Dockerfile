# One image for every autopause process: the roles (run ingest|scheduler|worker),
# migrate, the E2B emulator and the traffic generator. docker-compose.yml picks the
# command; health checks are set there too. /var/lib/autopause/rabbitmq is where the
# rabbitmq-definitions service writes the broker's definitions (a volume shared with RabbitMQ).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/autopause

# Dependencies first, in their own layer: a code change does not download them again.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY schemas/ schemas/
COPY consumer/ consumer/
COPY e2b_emulator/ e2b_emulator/
RUN pip install . \
    && groupadd --system --gid 10001 autopause \
    && useradd --system --uid 10001 --gid autopause --create-home --home-dir /home/autopause \
        --shell /usr/sbin/nologin autopause \
    && install -d -o autopause -g autopause /var/lib/autopause/rabbitmq

USER 10001:10001
WORKDIR /home/autopause

# /metrics, /healthz and /readyz (AUTOPAUSE_METRICS_PORT)
EXPOSE 9464

ENTRYPOINT ["autopause"]
CMD ["--help"]
