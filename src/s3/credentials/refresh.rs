//! [`SharedCredentials`]: the credentials every request signs with, and the background task
//! that keeps them valid.
//!
//! A request takes one [`Snapshot`] (an `Arc` cloned under a read lock) and signs with it
//! alone; a renewal builds a whole new snapshot and swaps the `Arc`, so no request ever sees
//! the key id of one set with the secret or token of another.
//!
//! Renewal: temporary credentials are fetched again from the same provider a few minutes
//! before they expire (a third of their lifetime for short ones, at most five minutes, less a
//! random part of that margin, so many mounts do not renew at the same instant). A failed
//! renewal is logged and retried with growing delays (1 s doubling to 60 s); the old
//! credentials serve until they expire. Only then do requests fail, with `AccessDenied`
//! (EACCES) naming the provider and the last error. Credentials without an expiry that come
//! from files (static keys, and the profile's other settings) are read again when a file's
//! modification time changes (checked every few seconds) or on SIGHUP.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use super::{format_time, Context, Credentials, Fetched, Provider, ProviderError};

/// One set of credentials and what is known about it.
#[derive(Debug)]
pub struct Snapshot {
    pub credentials: Credentials,
    pub expires: Option<SystemTime>,
    pub obtained: SystemTime,
    /// The files read for it, with the modification time they had.
    watched: Vec<(PathBuf, Option<SystemTime>)>,
}

impl Snapshot {
    fn new(f: Fetched) -> Self {
        Self {
            watched: f.watch.iter().map(|p| (p.clone(), mtime(p))).collect(),
            credentials: f.credentials,
            expires: f.expires,
            obtained: SystemTime::now(),
        }
    }

    fn files_changed(&self) -> bool {
        self.watched.iter().any(|(p, t)| mtime(p) != *t)
    }

    /// When to renew: before expiry by a third of the lifetime, at most five minutes, less a
    /// random share of that margin. `jitter` is in 0..1.
    pub fn renew_at(&self, jitter: f64) -> Option<SystemTime> {
        let expires = self.expires?;
        let lifetime = expires
            .duration_since(self.obtained)
            .unwrap_or(Duration::ZERO);
        let margin = (lifetime / 3).min(MAX_MARGIN);
        let early = margin.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
        Some(expires - margin - early)
    }
}

fn mtime(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

const MAX_MARGIN: Duration = Duration::from_secs(300);
/// How often files are checked for changes.
const FILE_POLL: Duration = Duration::from_secs(2);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Why a request cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub message: String,
}

pub struct SharedCredentials {
    current: RwLock<Arc<Snapshot>>,
    source: Option<(Arc<dyn Provider>, Context)>,
    name: String,
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for SharedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCredentials")
            .field("provider", &self.name)
            .field("current", &self.snapshot())
            .finish()
    }
}

impl SharedCredentials {
    /// Credentials from `provider`, first fetched as `first`.
    pub fn new(provider: Arc<dyn Provider>, ctx: Context, first: Fetched) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(Snapshot::new(first))),
            name: provider.name(),
            source: Some((provider, ctx)),
            last_error: Mutex::new(None),
        })
    }

    /// Fixed credentials that are never renewed.
    pub fn fixed(credentials: Credentials, name: &str) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(Snapshot::new(Fetched::new(credentials, None)))),
            name: name.to_string(),
            source: None,
            last_error: Mutex::new(None),
        })
    }

    pub fn provider_name(&self) -> &str {
        &self.name
    }

    /// The current set, expired or not.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The set to sign a request with now, or why there is none.
    pub fn current(&self) -> Result<Arc<Snapshot>, Expired> {
        let snap = self.snapshot();
        match snap.expires {
            Some(t) if SystemTime::now() >= t => {
                let last = self
                    .last_error()
                    .unwrap_or_else(|| "not renewed yet".to_string());
                Err(Expired {
                    message: format!(
                        "the credentials from {} expired at {} and could not be renewed: {last}",
                        self.name,
                        format_time(t)
                    ),
                })
            }
            _ => Ok(snap),
        }
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    fn set_last_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    /// Fetches a new set from the provider and swaps it in.
    pub async fn renew(&self) -> Result<(), ProviderError> {
        let Some((provider, ctx)) = &self.source else {
            return Ok(());
        };
        let fetched = provider.fetch(ctx).await?.unexpired()?;
        let snap = Arc::new(Snapshot::new(fetched));
        let expires = snap.expires;
        match self.current.write() {
            Ok(mut g) => *g = snap,
            Err(poisoned) => *poisoned.into_inner() = snap,
        }
        self.set_last_error(None);
        tracing::info!(
            provider = %self.name,
            expires = %expires.map_or_else(|| "never".to_string(), format_time),
            "credentials renewed"
        );
        Ok(())
    }

    /// The background task: renews before expiry, when watched files change and on SIGHUP,
    /// forever. Spawn it on the mount's runtime.
    pub async fn keep_fresh(self: Arc<Self>) {
        if self.source.is_none() {
            return;
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = signal(SignalKind::hangup()).ok();
        let mut retry_delay: Option<Duration> = None;
        let mut renew_at = self.snapshot().renew_at(fastrand::f64());
        loop {
            let wait = match (retry_delay, renew_at) {
                (Some(d), _) => d,
                (None, Some(at)) => at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .min(FILE_POLL),
                (None, None) => FILE_POLL,
            };
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                _ = hup => true,
            };
            let snap = self.snapshot();
            let due = renew_at.is_some_and(|at| SystemTime::now() >= at);
            if forced {
                tracing::info!(provider = %self.name, "SIGHUP: reading the credentials again");
            }
            if !(forced || due || retry_delay.is_some() || snap.files_changed()) {
                continue;
            }
            match self.renew().await {
                Ok(()) => {
                    retry_delay = None;
                    renew_at = self.snapshot().renew_at(fastrand::f64());
                }
                Err(e) => {
                    let expired = snap.expires.is_some_and(|t| SystemTime::now() >= t);
                    let next = retry_delay
                        .map_or(Duration::from_secs(1), |d| (d * 2).min(MAX_RETRY_DELAY));
                    if expired {
                        tracing::error!(provider = %self.name, error = %e, retry_in = ?next,
                            "credentials expired and cannot be renewed; S3 operations fail with EACCES until they are");
                    } else {
                        tracing::warn!(provider = %self.name, error = %e, retry_in = ?next,
                            expires = %snap.expires.map_or_else(|| "never".to_string(), format_time),
                            "renewing credentials failed; the current ones stay in use");
                    }
                    self.set_last_error(Some(e.to_string()));
                    if snap.expires.is_none() {
                        // Keys without expiry stay valid: retry only when the files change again.
                        retry_delay = None;
                        self.mark_files_seen();
                    } else {
                        retry_delay = Some(next);
                    }
                }
            }
        }
    }

    /// After a failed re-read of changed files, remember their new times so the broken file is
    /// not read again every poll (the next edit is).
    fn mark_files_seen(&self) {
        let snap = self.snapshot();
        let fresh = Snapshot {
            credentials: snap.credentials.clone(),
            expires: snap.expires,
            obtained: snap.obtained,
            watched: snap
                .watched
                .iter()
                .map(|(p, _)| (p.clone(), mtime(p)))
                .collect(),
        };
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(fresh),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(fresh),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(lifetime: Duration) -> Snapshot {
        let now = SystemTime::now();
        Snapshot {
            credentials: Credentials::new("A", "s", None),
            expires: Some(now + lifetime),
            obtained: now,
            watched: vec![],
        }
    }

    #[test]
    fn renewal_margin() {
        let hour = snap(Duration::from_secs(3600));
        let exp = hour.expires.unwrap();
        assert_eq!(hour.renew_at(0.0), Some(exp - Duration::from_secs(300)));
        assert_eq!(hour.renew_at(1.0), Some(exp - Duration::from_secs(450)));
        let short = snap(Duration::from_secs(21));
        let exp = short.expires.unwrap();
        assert_eq!(short.renew_at(0.0), Some(exp - Duration::from_secs(7)));
        let at = short.renew_at(0.999).unwrap();
        assert!(
            at > short.obtained + Duration::from_secs(10),
            "not renewed right away"
        );
        let never = Snapshot {
            expires: None,
            ..snap(Duration::ZERO)
        };
        assert_eq!(never.renew_at(0.5), None);
    }

    #[test]
    fn expired_credentials_are_refused_with_the_provider() {
        let shared = SharedCredentials::fixed(Credentials::new("A", "s", None), "test source");
        assert!(shared.current().is_ok());
        let old = Snapshot {
            expires: Some(SystemTime::now() - Duration::from_secs(1)),
            ..snap(Duration::ZERO)
        };
        *shared.current.write().unwrap() = Arc::new(old);
        shared.set_last_error(Some("STS said no".into()));
        let e = shared.current().unwrap_err();
        assert!(
            e.message.contains("test source") && e.message.contains("STS said no"),
            "{e:?}"
        );
    }

    #[test]
    fn file_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("credentials");
        std::fs::write(&f, "a").unwrap();
        let mut fetched = Fetched::new(Credentials::new("A", "s", None), None);
        fetched.watch.push(f.clone());
        let s = Snapshot::new(fetched);
        assert!(!s.files_changed());
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(s.files_changed());
    }
}
