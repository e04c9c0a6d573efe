//! Connection targets: the parsed `postgres://` URL (driver config, TLS roots, pool size and
//! timeout parameters taken out of the URL), the rustls TLS connector, and the error text and
//! redaction used in messages, which never show credentials.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ::postgres::{Client, Config};

use crate::StoreError;

use super::DEFAULT_POOL_TIMEOUT;

/// A parsed connection URL: the driver's config, the TLS root file, and `host:port` for messages.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: Config,
    root_cert: Option<String>,
    /// `host:port` (several joined by `,`), for messages: no user, no password.
    pub(crate) display: String,
    /// Longest wait for a pooled connection when every one is in use (`pool_timeout=SECONDS` in
    /// the URL, default [`DEFAULT_POOL_TIMEOUT`]); then the call is [`StoreError::Unavailable`].
    pub(crate) pool_timeout: Duration,
}

impl Target {
    pub(crate) fn parse(url: &str, connect_timeout: Duration) -> Result<Target, StoreError> {
        // `sslrootcert` is libpq's; the driver refuses options it does not know.
        let (url, root_cert) = take_query_param(url, "sslrootcert");
        // Ours, not the driver's (it refuses options it does not know).
        let (url, pool_timeout) = take_query_param(&url, "pool_timeout");
        let pool_timeout = match pool_timeout {
            None => DEFAULT_POOL_TIMEOUT,
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| StoreError::Unavailable {
                    target: redact(&url),
                    reason: format!(
                        "pool_timeout={v}: seconds (more than 0, at most 3600) expected"
                    ),
                })?,
        };
        let mut config = Config::from_str(&url).map_err(|e| StoreError::Unavailable {
            target: redact(&url),
            reason: format!("not a valid PostgreSQL URL: {e}"),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("fhirhose");
        }
        // Each connection keeps its statements prepared (`statements`). Planned for each run
        // with its parameter values, as the text statements they replace were: left to itself
        // the server may switch a statement run five times to one generic plan, made for an
        // average value, the wrong plan for a search on a skewed column.
        let options = match config.get_options() {
            Some(o) if o.contains("plan_cache_mode") => o.to_string(),
            Some(o) => format!("{o} -c plan_cache_mode=force_custom_plan"),
            None => "-c plan_cache_mode=force_custom_plan".to_string(),
        };
        config.options(&options);
        // No `sslmode` in the URL: plain text. (The driver's own default, `prefer`, would try TLS
        // and, with a server certificate our verifier refuses — e.g. Debian's self-signed
        // snakeoil one — fail instead of falling back.) `require`/`prefer` use TLS and verify.
        if !url.contains("sslmode=") {
            config.ssl_mode(::postgres::config::SslMode::Disable);
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                ::postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                ::postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports = config.get_ports();
        let display = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{h}:{port}")
            })
            .collect::<Vec<_>>()
            .join(",");
        Ok(Target {
            config,
            root_cert,
            display,
            pool_timeout,
        })
    }

    pub(super) fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &self.root_cert {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| self.unavailable(format!("sslrootcert {path}: {e}")))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| self.unavailable(format!("sslrootcert {path}: {e}")))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| self.unavailable(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    pub(crate) fn unavailable(&self, reason: String) -> StoreError {
        StoreError::Unavailable {
            target: self.display.clone(),
            reason,
        }
    }

    /// Open one connection, its commits durable ([`durable_commits`]).
    pub(crate) fn connect(&self) -> Result<Client, StoreError> {
        let tls = self.tls()?;
        let mut client = self
            .config
            .connect(tls)
            .map_err(|e| self.unavailable(describe(&e)))?;
        durable_commits(&mut client, &self.display).map_err(|e| self.unavailable(describe(&e)))?;
        Ok(client)
    }
}

/// A write is answered once its transaction commits, so a commit must be on disk when it
/// returns. With `synchronous_commit = off` (a database, role or cluster default some
/// operators choose for speed) it returns before its log record is flushed, and a crash of the
/// database server loses writes already answered `201`, or an export's committed file: the
/// `database-wal-full` fault case on a cluster set so (a full log disk makes PostgreSQL PANIC)
/// had 166 POSTs acknowledged and 165 Patients after the restart. Such a connection is set to
/// `local` (the commit waits for the local flush); `on` and the `remote_*` settings, which also
/// wait for synchronous standbys, are left as configured. One round trip per new connection.
fn durable_commits(client: &mut Client, target_db: &str) -> Result<(), ::postgres::Error> {
    let setting = client
        .simple_query("SHOW synchronous_commit")?
        .into_iter()
        .find_map(|m| match m {
            ::postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
    if setting.as_deref() == Some("off") {
        client.batch_execute("SET synchronous_commit = local")?;
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(%target_db, "the database's synchronous_commit is off: Fhirhose's connections use `local`, so that an acknowledged write survives a crash of the database server");
        });
    }
    Ok(())
}

/// The driver's error text, with the database's own message when there is one.
pub(super) fn describe(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// `url` without the password (for a message about a URL that did not parse).
pub(super) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "(invalid URL)".into();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => authority[at + 1..].to_string(),
        None => authority.to_string(),
    }
}

/// Remove `name=value` from the query of `url`; returns the URL without it and the value.
pub(super) fn take_query_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some(q) = url.find('?') else {
        return (url.to_string(), None);
    };
    let (base, query) = (&url[..q], &url[q + 1..]);
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    if kept.is_empty() {
        (base.to_string(), value)
    } else {
        (format!("{base}?{}", kept.join("&")), value)
    }
}

/// Whether `e` means the connection is gone (or the server is going away): the call can be retried
/// on another connection once the database is back.
pub(crate) fn is_connection_error(e: &::postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        // 08: connection exception; 57P01-57P03: admin/crash shutdown, cannot connect now;
        // 25P03: the server ended a session idle in a transaction (the job queue's timeout);
        // 25006: a read-only transaction refused a write — the server is a standby (a
        // failover demoted it, or the URL names a replica) or the database is read-only for
        // maintenance: writes can succeed later, on a new connection (with several hosts and
        // `target_session_attrs=read-write`, to the new primary), so this one is dropped too.
        return c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "25P03" | "25006");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a connection's `synchronous_commit` is after `connect`, when its database's default
    /// is `setting` (a fresh database of the test cluster; skipped without one).
    fn synchronous_commit_under(setting: &str) -> Option<String> {
        let base = crate::testing::test_database_url()?;
        let db = crate::testing::fresh_database(&base).expect("database");
        crate::testing::admin_batch(
            &base,
            &format!(
                "ALTER DATABASE {} SET synchronous_commit = {setting}",
                db.name
            ),
        )
        .expect("alter");
        let target = Target::parse(&db.url, Duration::from_secs(10)).expect("url");
        let mut client = target.connect().expect("connect");
        let row = client
            .query_one("SELECT current_setting('synchronous_commit')", &[])
            .expect("show");
        Some(row.get(0))
    }

    #[test]
    fn commits_are_flushed_before_they_return_whatever_the_database_default() {
        for (default, expected) in [
            ("off", "local"),
            ("local", "local"),
            ("on", "on"),
            ("remote_apply", "remote_apply"),
        ] {
            let Some(got) = synchronous_commit_under(default) else {
                return;
            };
            assert_eq!(got, expected, "database default {default}");
        }
    }

    #[test]
    fn sslrootcert_is_taken_out_of_the_url() {
        assert_eq!(
            take_query_param(
                "postgres://h/db?sslmode=require&sslrootcert=/ca.pem",
                "sslrootcert"
            ),
            (
                "postgres://h/db?sslmode=require".to_string(),
                Some("/ca.pem".to_string())
            )
        );
        assert_eq!(
            take_query_param("postgres://h/db?sslrootcert=/ca.pem", "sslrootcert"),
            ("postgres://h/db".to_string(), Some("/ca.pem".to_string()))
        );
        assert_eq!(
            take_query_param("postgres://h/db", "sslrootcert"),
            ("postgres://h/db".to_string(), None)
        );
    }

    #[test]
    fn targets_name_host_and_port_without_credentials() {
        let t = Target::parse(
            "postgres://fh:s3cret@db.example:6543/fhir?sslmode=require&sslrootcert=/x.pem",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(t.display, "db.example:6543");
        assert_eq!(t.root_cert.as_deref(), Some("/x.pem"));
        assert_eq!(
            t.config.get_ssl_mode(),
            ::postgres::config::SslMode::Require
        );
        let t = Target::parse("postgresql://db/fhir", Duration::from_secs(1)).unwrap();
        assert_eq!(t.display, "db:5432");
        assert_eq!(
            t.config.get_ssl_mode(),
            ::postgres::config::SslMode::Disable
        );
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&Duration::from_secs(1))
        );
        assert_eq!(redact("postgres://u:pw@h:1/db?x=1"), "h:1");
        let e = match Target::parse("postgres://u:pw@h:port/db", Duration::from_secs(1)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a bad port parsed"),
        };
        assert!(!e.contains("pw"), "{e}");
    }
}
