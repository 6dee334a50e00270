CREATE TABLE IF NOT EXISTS revision_counter (id BIGINT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO revision_counter (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO meta (key, value) VALUES ('compacted_through', 0) ON CONFLICT (key) DO NOTHING;
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    revision BIGINT NOT NULL,
    value TEXT NOT NULL,
    expires BIGINT,
    PRIMARY KEY (kind, name)
);
CREATE INDEX IF NOT EXISTS resources_expires ON resources (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    revision BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    op BIGINT NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (username TEXT PRIMARY KEY, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    ptype TEXT NOT NULL,
    roles TEXT NOT NULL,
    expires BIGINT
);
CREATE INDEX IF NOT EXISTS sessions_principal ON sessions (principal);
CREATE TABLE IF NOT EXISTS audit (
    id BIGSERIAL PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    type TEXT NOT NULL,
    actor TEXT NOT NULL,
    success BIGINT NOT NULL,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time_ms);
