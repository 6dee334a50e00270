//! The SQL shared by both backends, written once: both engines accept the
//! same statements (`$N` placeholders, `RETURNING`, `ON CONFLICT`), so a
//! macro instantiates one implementation per sqlx driver.

macro_rules! impl_backend {
    ($backend:ident, $db:ty, $notify:expr) => {
        #[async_trait::async_trait]
        impl $crate::storage::Backend for $backend {
            async fn apply(
                &self,
                ops: &[$crate::storage::WriteOp],
            ) -> portico_core::Result<Vec<$crate::storage::Event>> {
                use $crate::storage::{db_error, op_code, Event, Op, PutMode, WriteOp};
                use sqlx::Row;
                let _writer = self.write_guard().await;
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                // Lock the counter first: writers queue here until the holder
                // commits, so revision order is commit order and existence
                // checks below cannot race another writer.
                let start = lock_revisions(&mut tx).await?;
                let mut rev = start;
                let mut events = Vec::with_capacity(ops.len());
                for op in ops {
                    match op {
                        WriteOp::Put { kind, name, value, expires, mode } => {
                            let existing = sqlx::query(
                                "SELECT revision FROM resources WHERE kind = $1 AND name = $2",
                            )
                            .bind(kind.as_str())
                            .bind(name.as_str())
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(db_error)?;
                            match (mode, existing.is_some()) {
                                (PutMode::Create, true) => {
                                    return Err(portico_core::Error::already_exists(format!(
                                        "{kind} {name:?} already exists; use -f to overwrite it"
                                    )));
                                }
                                (PutMode::Update, false) => {
                                    return Err(portico_core::Error::not_found(format!(
                                        "{kind} {name:?} not found"
                                    )));
                                }
                                _ => {}
                            }
                            rev += 1;
                            sqlx::query(
                                "INSERT INTO resources (kind, name, revision, value, expires, owner) VALUES ($1, $2, $3, $4, $5, NULL)
                                 ON CONFLICT (kind, name) DO UPDATE SET revision = excluded.revision, value = excluded.value, expires = excluded.expires, owner = NULL",
                            )
                            .bind(kind.as_str())
                            .bind(name.as_str())
                            .bind(rev)
                            .bind(value.as_str())
                            .bind(*expires)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_error)?;
                            let ev = Event { revision: rev, op: Op::Put, kind: *kind, name: name.clone(), value: value.clone() };
                            insert_event(&mut tx, &ev).await?;
                            events.push(ev);
                        }
                        WriteOp::Delete { kind, name, expired_before } => {
                            let row = sqlx::query(
                                "SELECT value, expires FROM resources WHERE kind = $1 AND name = $2",
                            )
                            .bind(kind.as_str())
                            .bind(name.as_str())
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(db_error)?;
                            let Some(row) = row else {
                                if expired_before.is_some() {
                                    continue;
                                }
                                return Err(portico_core::Error::not_found(format!(
                                    "{kind} {name:?} not found"
                                )));
                            };
                            let value: String = row.try_get(0).map_err(db_error)?;
                            let expires: Option<i64> = row.try_get(1).map_err(db_error)?;
                            if let Some(t) = expired_before {
                                if !matches!(expires, Some(e) if e < *t) {
                                    continue;
                                }
                            }
                            rev += 1;
                            sqlx::query("DELETE FROM resources WHERE kind = $1 AND name = $2")
                                .bind(kind.as_str())
                                .bind(name.as_str())
                                .execute(&mut *tx)
                                .await
                                .map_err(db_error)?;
                            let ev = Event { revision: rev, op: Op::Delete, kind: *kind, name: name.clone(), value };
                            insert_event(&mut tx, &ev).await?;
                            events.push(ev);
                        }
                    }
                }
                if !events.is_empty() {
                    advance_revisions(&mut tx, rev).await?;
                }
                tx.commit().await.map_err(db_error)?;
                let _ = op_code;
                Ok(events)
            }

            async fn get(
                &self,
                kind: portico_core::Kind,
                name: &str,
            ) -> portico_core::Result<Option<$crate::storage::Record>> {
                use $crate::storage::db_error;
                let row = sqlx::query(
                    "SELECT kind, name, revision, value, expires FROM resources WHERE kind = $1 AND name = $2",
                )
                .bind(kind.as_str())
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
                row.map(|r| record(&r)).transpose()
            }

            async fn list(
                &self,
                kind: portico_core::Kind,
            ) -> portico_core::Result<Vec<$crate::storage::Record>> {
                use $crate::storage::db_error;
                let rows = sqlx::query(
                    "SELECT kind, name, revision, value, expires FROM resources WHERE kind = $1 ORDER BY name",
                )
                .bind(kind.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.iter().map(record).collect()
            }

            async fn snapshot(
                &self,
                kinds: &[portico_core::Kind],
            ) -> portico_core::Result<(Vec<$crate::storage::Record>, i64)> {
                use $crate::storage::db_error;
                use sqlx::Row;
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                sqlx::query(Self::SNAPSHOT_ISOLATION).execute(&mut *tx).await.map_err(db_error)?;
                let rev: i64 = sqlx::query("SELECT value FROM revision_counter WHERE id = 1")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .try_get(0)
                    .map_err(db_error)?;
                let rows = sqlx::query(
                    "SELECT kind, name, revision, value, expires FROM resources ORDER BY kind, name",
                )
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                let mut out = Vec::new();
                for r in &rows {
                    let rec = record(r)?;
                    if kinds.is_empty() || kinds.contains(&rec.kind) {
                        out.push(rec);
                    }
                }
                Ok((out, rev))
            }

            async fn events_after(
                &self,
                after: i64,
                limit: i64,
            ) -> portico_core::Result<Vec<$crate::storage::Event>> {
                use $crate::storage::{db_error, kind_from_db, op_from_code, Event};
                use sqlx::Row;
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                sqlx::query(Self::SNAPSHOT_ISOLATION).execute(&mut *tx).await.map_err(db_error)?;
                let horizon: i64 = sqlx::query("SELECT value FROM meta WHERE key = 'compacted_through'")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .try_get(0)
                    .map_err(db_error)?;
                if after < horizon {
                    return Err(portico_core::Error::new(
                        portico_core::Code::TooOld,
                        format!("revision {after} is older than the compaction horizon {horizon}; re-sync from a snapshot"),
                    ));
                }
                let rows = sqlx::query(
                    "SELECT revision, op, kind, name, value FROM events WHERE revision > $1 ORDER BY revision LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                rows.iter()
                    .map(|r| {
                        Ok(Event {
                            revision: r.try_get(0).map_err(db_error)?,
                            op: op_from_code(r.try_get(1).map_err(db_error)?),
                            kind: kind_from_db(r.try_get::<&str, _>(2).map_err(db_error)?)?,
                            name: r.try_get(3).map_err(db_error)?,
                            value: r.try_get(4).map_err(db_error)?,
                        })
                    })
                    .collect()
            }

            async fn current_revision(&self) -> portico_core::Result<i64> {
                use $crate::storage::db_error;
                use sqlx::Row;
                sqlx::query("SELECT value FROM revision_counter WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_error)?
                    .try_get(0)
                    .map_err(db_error)
            }

            async fn expired(
                &self,
                now_ms: i64,
            ) -> portico_core::Result<Vec<(portico_core::Kind, String)>> {
                use $crate::storage::{db_error, kind_from_db};
                use sqlx::Row;
                let rows = sqlx::query(
                    "SELECT kind, name FROM resources WHERE expires IS NOT NULL AND expires < $1 LIMIT 1000",
                )
                .bind(now_ms)
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.iter()
                    .map(|r| {
                        Ok((
                            kind_from_db(r.try_get::<&str, _>(0).map_err(db_error)?)?,
                            r.try_get(1).map_err(db_error)?,
                        ))
                    })
                    .collect()
            }

            async fn compact(&self, keep: i64, written_before_ms: i64) -> portico_core::Result<i64> {
                use $crate::storage::db_error;
                use sqlx::Row;
                let _writer = self.write_guard().await;
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                // Take the writers' lock so the horizon and the deletion agree.
                let rev = lock_revisions(&mut tx).await?;
                let aged: Option<i64> = sqlx::query("SELECT MAX(revision) FROM events WHERE time_ms > 0 AND time_ms < $1")
                    .bind(written_before_ms)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .try_get(0)
                    .map_err(db_error)?;
                let horizon = (rev - keep).max(aged.unwrap_or(0)).max(0);
                let old: i64 = sqlx::query("SELECT value FROM meta WHERE key = 'compacted_through'")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .try_get(0)
                    .map_err(db_error)?;
                if horizon > old {
                    sqlx::query("DELETE FROM events WHERE revision <= $1")
                        .bind(horizon)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_error)?;
                    sqlx::query("UPDATE meta SET value = $1 WHERE key = 'compacted_through'")
                        .bind(horizon)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_error)?;
                }
                tx.commit().await.map_err(db_error)?;
                Ok(horizon.max(old))
            }

            async fn set_password(&self, user: &str, hash: &str) -> portico_core::Result<()> {
                use $crate::storage::db_error;
                sqlx::query(
                    "INSERT INTO credentials (username, hash) VALUES ($1, $2)
                     ON CONFLICT (username) DO UPDATE SET hash = excluded.hash",
                )
                .bind(user)
                .bind(hash)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
                Ok(())
            }

            async fn password(&self, user: &str) -> portico_core::Result<Option<String>> {
                use $crate::storage::db_error;
                use sqlx::Row;
                let row = sqlx::query("SELECT hash FROM credentials WHERE username = $1")
                    .bind(user)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_error)?;
                row.map(|r| r.try_get(0).map_err(db_error)).transpose()
            }

            async fn delete_principal(&self, user: &str) -> portico_core::Result<()> {
                use $crate::storage::db_error;
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                sqlx::query("DELETE FROM credentials WHERE username = $1")
                    .bind(user)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                sqlx::query("DELETE FROM sessions WHERE principal = $1 AND ptype = 'user'")
                    .bind(user)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                let r = tx.commit().await.map_err(db_error);
                self.sessions_written();
                r
            }

            async fn put_session(&self, s: &$crate::storage::SessionRow) -> portico_core::Result<()> {
                use $crate::storage::db_error;
                let r = sqlx::query(
                    "INSERT INTO sessions (token_hash, principal, ptype, roles, expires) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(s.token_hash.as_str())
                .bind(s.principal.as_str())
                .bind(s.ptype.as_str())
                .bind(s.roles.as_str())
                .bind(s.expires)
                .execute(&self.pool)
                .await
                .map_err(db_error);
                self.sessions_written();
                r?;
                Ok(())
            }

            async fn session(
                &self,
                token_hash: &str,
            ) -> portico_core::Result<Option<$crate::storage::SessionRow>> {
                use $crate::storage::db_error;
                let generation = match self.session_cache().map(|c| c.get(token_hash)) {
                    Some(Ok(cached)) => return Ok(cached),
                    Some(Err(generation)) => Some(generation),
                    None => None,
                };
                let row = sqlx::query(
                    "SELECT token_hash, principal, ptype, roles, expires FROM sessions WHERE token_hash = $1",
                )
                .bind(token_hash)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
                row.as_ref()
                    .map(session_row)
                    .transpose()
                .inspect(|found| {
                    if let (Some(cache), Some(generation)) = (self.session_cache(), generation) {
                        cache.put(token_hash, found.clone(), generation);
                    }
                })
            }

            async fn sessions(
                &self,
                token_hashes: &[String],
            ) -> portico_core::Result<Vec<$crate::storage::SessionRow>> {
                use $crate::storage::db_error;
                let mut out = Vec::new();
                // Where lookups are kept (SQLite), each goes through the cache.
                if self.session_cache().is_some() {
                    for h in token_hashes {
                        if let Some(r) = self.session(h).await? {
                            out.push(r);
                        }
                    }
                    return Ok(out);
                }
                for chunk in token_hashes.chunks(500) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "SELECT token_hash, principal, ptype, roles, expires FROM sessions WHERE token_hash IN (",
                    );
                    let mut list = q.separated(", ");
                    for h in chunk {
                        list.push_bind(h.as_str());
                    }
                    list.push_unseparated(")");
                    for r in q.build().fetch_all(&self.pool).await.map_err(db_error)? {
                        out.push(session_row(&r)?);
                    }
                }
                Ok(out)
            }

            async fn cluster_ca(&self) -> portico_core::Result<Option<(String, String)>> {
                use $crate::storage::db_error;
                use sqlx::Row;
                let row = sqlx::query("SELECT cert_pem, key_pem FROM cluster_ca WHERE id = 1")
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_error)?;
                row.map(|r| Ok((r.try_get(0).map_err(db_error)?, r.try_get(1).map_err(db_error)?)))
                    .transpose()
            }

            async fn init_cluster_ca(
                &self,
                cert_pem: &str,
                key_pem: &str,
            ) -> portico_core::Result<(String, String)> {
                use $crate::storage::db_error;
                use sqlx::Row;
                sqlx::query(
                    "INSERT INTO cluster_ca (id, cert_pem, key_pem) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
                )
                .bind(cert_pem)
                .bind(key_pem)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
                let row = sqlx::query("SELECT cert_pem, key_pem FROM cluster_ca WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_error)?;
                Ok((
                    row.try_get(0).map_err(db_error)?,
                    row.try_get(1).map_err(db_error)?,
                ))
            }

            async fn init_cluster_key(
                &self,
                name: &str,
                key_pem: &str,
            ) -> portico_core::Result<String> {
                use $crate::storage::db_error;
                use sqlx::Row;
                sqlx::query(
                    "INSERT INTO cluster_keys (name, key_pem) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(key_pem)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
                let row = sqlx::query("SELECT key_pem FROM cluster_keys WHERE name = $1")
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_error)?;
                row.try_get(0).map_err(db_error)
            }

            async fn service_sessions(
                &self,
            ) -> portico_core::Result<Vec<$crate::storage::SessionRow>> {
                use $crate::storage::db_error;
                let rows = sqlx::query(
                    "SELECT token_hash, principal, ptype, roles, expires FROM sessions WHERE ptype = 'service' ORDER BY principal",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.iter().map(session_row).collect()
            }

            async fn revoke_service(&self, principal: &str) -> portico_core::Result<u64> {
                use $crate::storage::db_error;
                let r = sqlx::query("DELETE FROM sessions WHERE principal = $1 AND ptype = 'service'")
                    .bind(principal)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error);
                self.sessions_written();
                Ok(r?.rows_affected())
            }

            async fn purge_expired_service(&self, principal: &str, now_ms: i64) -> portico_core::Result<()> {
                use $crate::storage::db_error;
                let r = sqlx::query("DELETE FROM sessions WHERE principal = $1 AND ptype = 'service' AND expires IS NOT NULL AND expires < $2")
                    .bind(principal)
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error);
                self.sessions_written();
                r?;
                Ok(())
            }

            async fn delete_session(&self, token_hash: &str) -> portico_core::Result<()> {
                use $crate::storage::db_error;
                let r = sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
                    .bind(token_hash)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error);
                self.sessions_written();
                r?;
                Ok(())
            }

            async fn extend_session(&self, token_hash: &str, expires: i64) -> portico_core::Result<bool> {
                use $crate::storage::db_error;
                let r = sqlx::query("UPDATE sessions SET expires = $1 WHERE token_hash = $2 AND (expires IS NULL OR expires >= $3)")
                    .bind(expires)
                    .bind(token_hash)
                    .bind(portico_core::time::now_ms())
                    .execute(&self.pool)
                    .await
                    .map_err(db_error);
                self.sessions_written();
                Ok(r?.rows_affected() == 1)
            }

            async fn purge_sessions(&self, now_ms: i64) -> portico_core::Result<u64> {
                use $crate::storage::db_error;
                let r = sqlx::query("DELETE FROM sessions WHERE expires IS NOT NULL AND expires < $1")
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error);
                self.sessions_written();
                Ok(r?.rows_affected())
            }

            async fn purge_audit(&self, before_ms: i64) -> portico_core::Result<u64> {
                use $crate::storage::db_error;
                const CHUNK: i64 = 5_000;
                let mut total = 0;
                loop {
                    let _writer = self.write_guard().await;
                    let r = sqlx::query(
                        "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE time_ms < $1 ORDER BY time_ms LIMIT $2)",
                    )
                    .bind(before_ms)
                    .bind(CHUNK)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error)?;
                    total += r.rows_affected();
                    if r.rows_affected() < CHUNK as u64 {
                        return Ok(total);
                    }
                }
            }

            async fn append_audit(&self, events: &[$crate::storage::AuditRecord]) -> portico_core::Result<()> {
                use $crate::storage::db_error;
                if events.is_empty() {
                    return Ok(());
                }
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                // Many rows per statement: one round trip to the database
                // (for SQLite, to its worker thread) per 256 records. The
                // rest goes in statements of 128, 64, ... rows: a handful of
                // statements, each prepared once per connection and then
                // taken from its cache, where a statement of every other
                // size would be prepared anew.
                let mut rest = events;
                while !rest.is_empty() {
                    let n = if rest.len() >= 256 { 256 } else { 1 << rest.len().ilog2() };
                    let (chunk, after) = rest.split_at(n);
                    rest = after;
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO audit (time_ms, type, actor, success, fields) ",
                    );
                    q.push_values(chunk, |mut b, e| {
                        b.push_bind(e.time_ms)
                            .push_bind(e.kind.as_str())
                            .push_bind(e.actor.as_str())
                            .push_bind(if e.success { 1i64 } else { 0i64 })
                            .push_bind(e.fields.as_str());
                    });
                    q.build().execute(&mut *tx).await.map_err(db_error)?;
                }
                tx.commit().await.map_err(db_error)
            }

            async fn list_audit(
                &self,
                kind: Option<&str>,
                since_ms: i64,
                limit: i64,
            ) -> portico_core::Result<Vec<$crate::storage::AuditRecord>> {
                // The newest `limit`, oldest first.
                let mut page = self.audit_page(kind, since_ms, 0, i64::MAX, limit).await?;
                page.reverse();
                Ok(page)
            }

            async fn audit_page(
                &self,
                kind: Option<&str>,
                since_ms: i64,
                until_ms: i64,
                before_id: i64,
                limit: i64,
            ) -> portico_core::Result<Vec<$crate::storage::AuditRecord>> {
                use $crate::storage::{db_error, AuditRecord};
                use sqlx::Row;
                let rows = sqlx::query(
                    "SELECT id, time_ms, type, actor, success, fields FROM audit
                     WHERE id < $1 AND time_ms >= $2 AND ($3 <= 0 OR time_ms < $3)
                       AND ($4 = '' OR type = $4 OR type LIKE $5)
                     ORDER BY id DESC LIMIT $6",
                )
                .bind(before_id)
                .bind(since_ms)
                .bind(until_ms)
                .bind(kind.unwrap_or(""))
                .bind(format!("{}.%", kind.unwrap_or("")))
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.iter()
                    .map(|r| {
                        Ok(AuditRecord {
                            id: r.try_get(0).map_err(db_error)?,
                            time_ms: r.try_get(1).map_err(db_error)?,
                            kind: r.try_get(2).map_err(db_error)?,
                            actor: r.try_get(3).map_err(db_error)?,
                            success: r.try_get::<i64, _>(4).map_err(db_error)? != 0,
                            fields: r.try_get(5).map_err(db_error)?,
                        })
                    })
                    .collect()
            }

            async fn renew_lease(&self, host: &str, now_ms: i64, expires: i64) -> portico_core::Result<bool> {
                use $crate::storage::db_error;
                let _writer = self.write_guard().await;
                let live = sqlx::query("UPDATE leases SET expires = $1 WHERE host_id = $2 AND expires >= $3")
                    .bind(expires)
                    .bind(host)
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error)?
                    .rows_affected();
                if live > 0 {
                    return Ok(true);
                }
                // Expired but not yet swept: its records are still there;
                // keep them, and tell the agent to check them.
                sqlx::query("UPDATE leases SET expires = $1 WHERE host_id = $2")
                    .bind(expires)
                    .bind(host)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error)?;
                Ok(false)
            }

            async fn announce(
                &self,
                host: &str,
                now_ms: i64,
                expires: i64,
                put: &[(String, String)],
                withdraw: &[String],
            ) -> portico_core::Result<(bool, Vec<$crate::storage::Event>)> {
                use $crate::storage::{db_error, Event, Op};
                use sqlx::Row;
                use std::collections::HashMap;
                let _writer = self.write_guard().await;
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                let start = lock_revisions(&mut tx).await?;
                let was: Option<i64> = sqlx::query("SELECT expires FROM leases WHERE host_id = $1")
                    .bind(host)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .map(|r| r.try_get(0))
                    .transpose()
                    .map_err(db_error)?;
                let mut events = Vec::new();
                if !put.is_empty() || !withdraw.is_empty() {
                    // The records named in this call, whoever holds them:
                    // name -> (owner, value).
                    let mut current: HashMap<String, (Option<String>, String)> = HashMap::new();
                    let names: Vec<&str> = put.iter().map(|(n, _)| n.as_str()).chain(withdraw.iter().map(String::as_str)).collect();
                    for chunk in names.chunks(500) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "SELECT name, owner, value FROM resources WHERE kind = 'app_server' AND name IN (",
                        );
                        let mut list = q.separated(", ");
                        for n in chunk {
                            list.push_bind(*n);
                        }
                        q.push(")");
                        for r in q.build().fetch_all(&mut *tx).await.map_err(db_error)? {
                            current.insert(
                                r.try_get(0).map_err(db_error)?,
                                (r.try_get(1).map_err(db_error)?, r.try_get(2).map_err(db_error)?),
                            );
                        }
                    }
                    let mut rev = start;
                    let mut puts = Vec::new();
                    for (name, value) in put {
                        match current.get(name) {
                            Some((Some(owner), v)) if owner == host && v == value => continue,
                            Some((Some(owner), _)) if owner == host => {}
                            // Written before leases (no owner, a TTL): this
                            // agent's own, under its name.
                            Some((None, _)) if name.ends_with(&format!(".{host}")) => {}
                            Some(_) => {
                                return Err(portico_core::Error::already_exists(format!(
                                    "app_server {name:?} belongs to another agent"
                                )));
                            }
                            None => {}
                        }
                        rev += 1;
                        puts.push(Event { revision: rev, op: Op::Put, kind: portico_core::Kind::AppServer, name: name.clone(), value: value.clone() });
                    }
                    let mut gone = Vec::new();
                    for name in withdraw {
                        if let Some((Some(owner), v)) = current.remove(name)
                            && owner == host
                        {
                            rev += 1;
                            gone.push(Event { revision: rev, op: Op::Delete, kind: portico_core::Kind::AppServer, name: name.clone(), value: v });
                        }
                    }
                    for chunk in puts.chunks(500) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "INSERT INTO resources (kind, name, revision, value, expires, owner) ",
                        );
                        q.push_values(chunk, |mut b, ev| {
                            b.push_bind(ev.kind.as_str())
                                .push_bind(ev.name.as_str())
                                .push_bind(ev.revision)
                                .push_bind(ev.value.as_str())
                                .push_bind(None::<i64>)
                                .push_bind(host);
                        });
                        q.push(" ON CONFLICT (kind, name) DO UPDATE SET revision = excluded.revision, value = excluded.value, expires = excluded.expires, owner = excluded.owner");
                        q.build().execute(&mut *tx).await.map_err(db_error)?;
                    }
                    for chunk in gone.chunks(500) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "DELETE FROM resources WHERE kind = 'app_server' AND name IN (",
                        );
                        let mut names = q.separated(", ");
                        for ev in chunk {
                            names.push_bind(ev.name.as_str());
                        }
                        q.push(")");
                        q.build().execute(&mut *tx).await.map_err(db_error)?;
                    }
                    events.extend(puts);
                    events.extend(gone);
                    if !events.is_empty() {
                        insert_events(&mut tx, &events).await?;
                        advance_revisions(&mut tx, rev).await?;
                    }
                }
                // The lease's row is locked last, so a slow batch does not
                // hold back the agent's renewals (which write only that row).
                sqlx::query(
                    "INSERT INTO leases (host_id, expires) VALUES ($1, $2)
                     ON CONFLICT (host_id) DO UPDATE SET expires = excluded.expires",
                )
                .bind(host)
                .bind(expires)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                Ok((was.is_some_and(|e| e >= now_ms), events))
            }

            async fn held(&self, host: &str) -> portico_core::Result<Vec<(String, String)>> {
                use $crate::storage::db_error;
                use sqlx::Row;
                let rows = sqlx::query("SELECT name, value FROM resources WHERE owner = $1 AND kind = 'app_server' ORDER BY name")
                    .bind(host)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_error)?;
                rows.iter()
                    .map(|r| Ok((r.try_get(0).map_err(db_error)?, r.try_get(1).map_err(db_error)?)))
                    .collect()
            }

            async fn expired_leases(&self, now_ms: i64) -> portico_core::Result<Vec<String>> {
                use $crate::storage::db_error;
                use sqlx::Row;
                let rows = sqlx::query("SELECT host_id FROM leases WHERE expires < $1 LIMIT 1000")
                    .bind(now_ms)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_error)?;
                rows.iter().map(|r| r.try_get(0).map_err(db_error)).collect()
            }

            async fn end_lease(
                &self,
                host: &str,
                expired_before: Option<i64>,
            ) -> portico_core::Result<Vec<$crate::storage::Event>> {
                use $crate::storage::{db_error, Event, Op};
                use sqlx::Row;
                let _writer = self.write_guard().await;
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                let start = lock_revisions(&mut tx).await?;
                let ended = sqlx::query("DELETE FROM leases WHERE host_id = $1 AND expires < $2")
                    .bind(host)
                    .bind(expired_before.unwrap_or(i64::MAX))
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .rows_affected();
                if ended == 0 && expired_before.is_some() {
                    // Renewed since it was found expired.
                    return Ok(Vec::new());
                }
                let rows = sqlx::query("SELECT name, value FROM resources WHERE owner = $1 AND kind = 'app_server' ORDER BY name")
                    .bind(host)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_error)?;
                let mut events = Vec::with_capacity(rows.len());
                for (i, r) in rows.iter().enumerate() {
                    events.push(Event {
                        revision: start + 1 + i as i64,
                        op: Op::Delete,
                        kind: portico_core::Kind::AppServer,
                        name: r.try_get(0).map_err(db_error)?,
                        value: r.try_get(1).map_err(db_error)?,
                    });
                }
                if !events.is_empty() {
                    sqlx::query("DELETE FROM resources WHERE owner = $1 AND kind = 'app_server'")
                        .bind(host)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_error)?;
                    insert_events(&mut tx, &events).await?;
                    advance_revisions(&mut tx, start + events.len() as i64).await?;
                }
                tx.commit().await.map_err(db_error)?;
                Ok(events)
            }

            async fn extend_leases(&self, until: i64) -> portico_core::Result<u64> {
                use $crate::storage::db_error;
                let _writer = self.write_guard().await;
                Ok(sqlx::query("UPDATE leases SET expires = $1 WHERE expires < $1")
                    .bind(until)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error)?
                    .rows_affected())
            }

            async fn subscribe_remote_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
                self.remote_changes().await
            }
        }

        /// Locks the revision counter for this transaction (writers queue
        /// here until the holder commits) and returns its value.
        async fn lock_revisions(tx: &mut sqlx::Transaction<'static, $db>) -> portico_core::Result<i64> {
            use $crate::storage::db_error;
            use sqlx::Row;
            sqlx::query("UPDATE revision_counter SET value = value WHERE id = 1 RETURNING value")
                .fetch_one(&mut **tx)
                .await
                .map_err(db_error)?
                .try_get(0)
                .map_err(db_error)
        }

        /// Moves the counter to the last revision written and tells other
        /// instances (Postgres NOTIFY) once the transaction commits.
        async fn advance_revisions(tx: &mut sqlx::Transaction<'static, $db>, rev: i64) -> portico_core::Result<()> {
            use $crate::storage::db_error;
            sqlx::query("UPDATE revision_counter SET value = $1 WHERE id = 1")
                .bind(rev)
                .execute(&mut **tx)
                .await
                .map_err(db_error)?;
            sqlx::query($notify).execute(&mut **tx).await.map_err(db_error)?;
            Ok(())
        }

        /// Appends many events with a few multi-row statements.
        async fn insert_events(
            tx: &mut sqlx::Transaction<'static, $db>,
            events: &[$crate::storage::Event],
        ) -> portico_core::Result<()> {
            use $crate::storage::{db_error, op_code};
            let now = portico_core::time::now_ms();
            for chunk in events.chunks(500) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO events (revision, kind, name, op, value, time_ms) ",
                );
                q.push_values(chunk, |mut b, ev| {
                    b.push_bind(ev.revision)
                        .push_bind(ev.kind.as_str())
                        .push_bind(ev.name.as_str())
                        .push_bind(op_code(ev.op))
                        .push_bind(ev.value.as_str())
                        .push_bind(now);
                });
                q.build().execute(&mut **tx).await.map_err(db_error)?;
            }
            Ok(())
        }

        async fn insert_event(
            tx: &mut sqlx::Transaction<'static, $db>,
            ev: &$crate::storage::Event,
        ) -> portico_core::Result<()> {
            use $crate::storage::{db_error, op_code};
            sqlx::query("INSERT INTO events (revision, kind, name, op, value, time_ms) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(ev.revision)
                .bind(ev.kind.as_str())
                .bind(ev.name.as_str())
                .bind(op_code(ev.op))
                .bind(ev.value.as_str())
                .bind(portico_core::time::now_ms())
                .execute(&mut **tx)
                .await
                .map_err(db_error)?;
            Ok(())
        }

        fn record(r: &<$db as sqlx::Database>::Row) -> portico_core::Result<$crate::storage::Record> {
            use $crate::storage::{db_error, kind_from_db, Record};
            use sqlx::Row;
            Ok(Record {
                kind: kind_from_db(r.try_get::<&str, _>(0).map_err(db_error)?)?,
                name: r.try_get(1).map_err(db_error)?,
                revision: r.try_get(2).map_err(db_error)?,
                value: r.try_get(3).map_err(db_error)?,
                expires: r.try_get(4).map_err(db_error)?,
            })
        }

        /// A row of `SELECT token_hash, principal, ptype, roles, expires FROM sessions`.
        fn session_row(
            r: &<$db as sqlx::Database>::Row,
        ) -> portico_core::Result<$crate::storage::SessionRow> {
            use $crate::storage::{db_error, SessionRow};
            use sqlx::Row;
            Ok(SessionRow {
                token_hash: r.try_get(0).map_err(db_error)?,
                principal: r.try_get(1).map_err(db_error)?,
                ptype: r.try_get(2).map_err(db_error)?,
                roles: r.try_get(3).map_err(db_error)?,
                expires: r.try_get(4).map_err(db_error)?,
            })
        }
    };
}
