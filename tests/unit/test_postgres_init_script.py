"""The shipped Postgres init script refuses to run without the application role's password."""

from __future__ import annotations

from ..helpers.config import ROOT
from ..helpers.processes import clean_env, run_sync

INIT_SCRIPT = ROOT / "deploy" / "postgres" / "10-autopause-role.sh"


def test_the_init_script_needs_the_application_password() -> None:
    env = {k: v for k, v in clean_env(POSTGRES_DB="autopause").items() if not k.startswith("PG")}
    done = run_sync(["bash", str(INIT_SCRIPT)], env, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "AUTOPAUSE_DB_PASSWORD" in done.stderr
    assert "psql" not in done.stderr, "it must refuse before it connects"
