-- Liveness per agent, not per app: one lease row per agent, renewed in
-- place (no revision, no event). An agent's app_server records name it as
-- their owner and live as long as its lease.
CREATE TABLE IF NOT EXISTS leases (
    host_id TEXT PRIMARY KEY,
    expires BIGINT NOT NULL
);
ALTER TABLE resources ADD COLUMN owner TEXT;
CREATE INDEX IF NOT EXISTS resources_owner ON resources (owner, kind) WHERE owner IS NOT NULL;
-- When each event was written, so the change log can be compacted by age.
ALTER TABLE events ADD COLUMN time_ms BIGINT NOT NULL DEFAULT 0;
