#!/bin/sh
# First start of the PostgreSQL container (empty data volume) only: one role and one
# database for Prefect's own state, one for the xrdct catalog. Passwords come from the
# container environment (compose.yaml <- infra/.env); psql's :'var' quoting keeps them
# out of the SQL text.
set -eu
: "${PREFECT_DB_PASSWORD:?}" "${XRDCT_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v prefect_pw="$PREFECT_DB_PASSWORD" -v xrdct_pw="$XRDCT_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE xrdct LOGIN PASSWORD :'xrdct_pw';
CREATE DATABASE xrdct OWNER xrdct;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
REVOKE ALL ON DATABASE xrdct FROM PUBLIC;
SQL
