//! The schema: migrations applied in order, `PRAGMA user_version` counting them.

use rusqlite::Connection;

use super::*;

/// Migrations, applied in order; `PRAGMA user_version` holds how many have run.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE groups (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE devices (
    id            TEXT PRIMARY KEY,
    group_name    TEXT NOT NULL REFERENCES groups(name),
    state         TEXT NOT NULL CHECK (state IN ('active', 'suspended', 'revoked')),
    state_reason  TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE enrollment_tokens (
    hash        BLOB PRIMARY KEY,
    device_id   TEXT NOT NULL REFERENCES devices(id),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_for    TEXT
) STRICT;
CREATE INDEX enrollment_tokens_device ON enrollment_tokens(device_id);

CREATE TABLE certificates (
    serial             TEXT PRIMARY KEY,
    device_id          TEXT NOT NULL REFERENCES devices(id),
    fingerprint        TEXT NOT NULL UNIQUE,
    spki_sha256        TEXT NOT NULL,
    not_before         INTEGER NOT NULL,
    not_after          INTEGER NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('valid', 'revoked')),
    revoked_at         INTEGER,
    revocation_reason  TEXT,
    issued_via         TEXT NOT NULL,
    der                BLOB NOT NULL,
    created_at         INTEGER NOT NULL
) STRICT;
CREATE INDEX certificates_device ON certificates(device_id);
CREATE INDEX certificates_spki ON certificates(spki_sha256);

CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    device_id  TEXT,
    serial     TEXT,
    detail     TEXT NOT NULL
) STRICT;
CREATE INDEX events_device ON events(device_id);
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

CREATE TABLE crl (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    number  INTEGER NOT NULL
) STRICT;
INSERT INTO crl (id, number) VALUES (1, 0);
"#,
    r#"
CREATE TABLE device_addresses (
    cidr        TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL REFERENCES devices(id),
    created_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX device_addresses_device ON device_addresses(device_id);

CREATE TABLE dns_queries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms        INTEGER NOT NULL,
    client       TEXT NOT NULL,
    device_id    TEXT,
    name         TEXT NOT NULL,
    qtype        TEXT NOT NULL,
    action       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    rcode        TEXT NOT NULL,
    upstream_us  INTEGER
) STRICT;
CREATE INDEX dns_queries_at ON dns_queries(at_ms);
CREATE INDEX dns_queries_device ON dns_queries(device_id, at_ms);
"#,
    r#"
CREATE TABLE profiles (
    name        TEXT PRIMARY KEY,
    document    TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;
ALTER TABLE devices ADD COLUMN profile TEXT REFERENCES profiles(name);

CREATE TABLE audit_runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    status       TEXT NOT NULL,
    request      TEXT NOT NULL,
    summary      TEXT NOT NULL
) STRICT;

CREATE TABLE audit_run_devices (
    run_id     INTEGER NOT NULL REFERENCES audit_runs(id),
    device_id  TEXT NOT NULL,
    PRIMARY KEY (run_id, device_id)
) STRICT;
CREATE INDEX audit_run_devices_device ON audit_run_devices(device_id, run_id);

CREATE TABLE audit_findings (
    run_id       INTEGER NOT NULL REFERENCES audit_runs(id),
    device_id    TEXT NOT NULL,
    key          TEXT NOT NULL,
    check_name   TEXT NOT NULL,
    severity     TEXT NOT NULL,
    title        TEXT NOT NULL,
    target       TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    why          TEXT NOT NULL,
    remediation  TEXT NOT NULL,
    baselines    TEXT NOT NULL,
    status       TEXT NOT NULL,
    PRIMARY KEY (run_id, device_id, key)
) STRICT;
"#,
    r#"
CREATE TABLE firmware_rollouts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    document    TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE firmware_devices (
    device_id   TEXT PRIMARY KEY,
    document    TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE firmware_reports (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   TEXT NOT NULL,
    at          INTEGER NOT NULL,
    document    TEXT NOT NULL
) STRICT;
CREATE INDEX firmware_reports_device ON firmware_reports(device_id, id);
"#,
    r#"
ALTER TABLE certificates ADD COLUMN crl_reason TEXT;
ALTER TABLE certificates ADD COLUMN superseded_by TEXT;
"#,
    // The query log is written at the DNS port's rate: one B-tree append per query, no
    // AUTOINCREMENT bookkeeping, no secondary index (each cost more than the row; a
    // device index takes random writes). Rows are in time order by id (one writer, in
    // arrival order), which is how time filters and pruning find their range.
    r#"
CREATE TABLE dns_queries_v6 (
    id           INTEGER PRIMARY KEY,
    at_ms        INTEGER NOT NULL,
    client       TEXT NOT NULL,
    device_id    TEXT,
    name         TEXT NOT NULL,
    qtype        TEXT NOT NULL,
    action       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    rcode        TEXT NOT NULL,
    upstream_us  INTEGER
) STRICT;
INSERT INTO dns_queries_v6 SELECT id, at_ms, client, device_id, name, qtype, action, reason, rcode, upstream_us
    FROM dns_queries ORDER BY id;
DROP TABLE dns_queries;
ALTER TABLE dns_queries_v6 RENAME TO dns_queries;
"#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

pub(super) fn migrate(conn: &mut Connection) -> Result<usize> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let current = usize::try_from(current).unwrap_or(usize::MAX);
    if current > MIGRATIONS.len() {
        return Err(Error::Backend(
            format!("database schema version {current} is newer than this build ({})", MIGRATIONS.len())
                .into(),
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(MIGRATIONS.len())
}
