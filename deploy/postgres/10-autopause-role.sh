#!/usr/bin/env bash
# PostgreSQL's init script for autopause (mounted into /docker-entrypoint-initdb.d/; the
# postgres image runs it once, when the data volume is first created, as POSTGRES_USER).
#
# Makes the application role `autopause` (AUTOPAUSE_DB_PASSWORD): it logs in, is no
# superuser, cannot create databases or roles, may connect to POSTGRES_DB only, and owns
# one schema, `autopause`, where the migrations create the tables. Nobody else may create
# anything in the public schema. To apply it to an existing volume:
#   docker compose exec -e AUTOPAUSE_DB_PASSWORD postgres bash /docker-entrypoint-initdb.d/10-autopause-role.sh
set -euo pipefail

: "${AUTOPAUSE_DB_PASSWORD:?the application role needs AUTOPAUSE_DB_PASSWORD}"
role=${AUTOPAUSE_DB_ROLE:-autopause}
schema=${AUTOPAUSE_DB_SCHEMA:-autopause}
database=${POSTGRES_DB:?}

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" --dbname "$database" \
  -v role="$role" -v schema="$schema" -v database="$database" -v password="$AUTOPAUSE_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'password';
ALTER ROLE :"role" SET search_path = :"schema";

REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"database" TO :"role";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

CREATE SCHEMA IF NOT EXISTS :"schema" AUTHORIZATION :"role";
ALTER SCHEMA :"schema" OWNER TO :"role";
REVOKE ALL ON SCHEMA :"schema" FROM PUBLIC;
SQL
echo "autopause: role $role owns schema $schema in database $database"
