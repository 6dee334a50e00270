-- Keys the cluster signs with besides its CA: the JWT key for apps with
-- `identity: jwt`. Private, like the CA's key; made once, at first need.
CREATE TABLE IF NOT EXISTS cluster_keys (
    name TEXT PRIMARY KEY,
    key_pem TEXT NOT NULL
);
