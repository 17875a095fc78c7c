"""The OpenMeter -> Stripe bridge, one concern per module (app.py is the web side).

errors          BridgeError and its answers (status, code, message, hint), ConfigError
logs            JSON log lines, Prometheus metrics
settings        Settings from the environment (secrets, addresses, budget, proxies)
config          config.yaml: meter -> price and subject -> subscription mappings, validated
config_yaml     config.yaml's text: plain YAML only (no aliases), keys as written, size and depth
config_source   config.yaml live: re-read when its bytes change, the last good version kept
signature       Svix: the signature, when an attempt was sent, the attempt's budget
report          OpenMeter's report.meter event: strict JSON, windows, completeness
budget          the webhook's time budget, which bounds every Stripe call
pacing          the Stripe rate budget (STRIPE_MAX_RATE), shared by workers and replicas
transport       stripe's HTTP transport (connections, proxies, per-request timeouts)
stripe_health   whether Stripe rejects the API key (for /readyz), shared by the workers
stripe_api      the one Stripe client, its retries, what a Stripe error answers
stripe_objects  subscriptions, prices and meters as read from Stripe, and their cache
targets         which Stripe object bills a report (Target, resolve_target)
sharing         several subjects on one subscription: what Stripe adds up, each one's second
quantities      a window's value as Stripe takes it (Quantity, MeterValue, zero thresholds)
planning        each window's checks, timestamp, key and write (plan_writes)
identity        every name a write goes by: lock key, place, keys, identifiers, digest
ledger          the ledger's interface: shared truth and the critical section per object
ledger_sql      the ledger's tables and queries, shared by both backends
ledger_sqlite   the ledger in SQLite (STATE_PATH): one host, fcntl byte-range locks
ledger_postgres the ledger in PostgreSQL (DATABASE_URL): replicas, advisory locks
writing         sending the writes to Stripe, inside the ledger's critical section
service         Bridge (all a webhook needs), make_bridge, process_event
online_check    check-config --online: Stripe's view of every mapping
sizing          check-config's sizing for Svix's fan-out: waves, the throttle to set
cli             the flask commands: check-config, replay
stopping        how a gunicorn worker stops: gracefully, on any stop signal, even while booting
"""
