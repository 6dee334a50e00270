-- Service identities now come with certificates: the ones issued before
-- cannot be used any more (their holders join again with a new token), and
-- a host id has at most one identity, so that two joins racing for one
-- host id cannot both win.
DELETE FROM sessions WHERE ptype = 'service';
CREATE UNIQUE INDEX IF NOT EXISTS sessions_one_service ON sessions (principal) WHERE ptype = 'service';
