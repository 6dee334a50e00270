-- The cluster's certificate authority: one row, written once.
CREATE TABLE IF NOT EXISTS cluster_ca (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL
);
