//! [`FaultySink`]: an export destination ([`export::Sink`]) that forwards every call to another
//! one, unless the test's fault hook answers the call first — a destination that is down for
//! some calls, or a step skipped. One delegating sink for every test, instead of a hand-written
//! forward of each method per test.

use std::io::Read;
use std::sync::{Arc, RwLock};

use export::sink::PartWriter;
use export::{FileBody, ObjectInfo, Sink, SinkError};

/// One call to the sink, as the fault hook sees it (`kind` and `location` cannot fail and are
/// always forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call<'a> {
    EnsureContainer {
        container: &'a str,
    },
    Create {
        container: &'a str,
        path: &'a str,
    },
    Rename {
        container: &'a str,
        from: &'a str,
        to: &'a str,
    },
    DeletePrefix {
        container: &'a str,
        prefix: &'a str,
    },
    ReadLimited {
        container: &'a str,
        path: &'a str,
    },
    OpenRead {
        container: &'a str,
        path: &'a str,
    },
    Stat {
        container: &'a str,
        path: &'a str,
    },
    OpenRange {
        container: &'a str,
        path: &'a str,
    },
    Body {
        container: &'a str,
        path: &'a str,
    },
}

/// What the fault hook does with a call instead of forwarding it.
#[derive(Debug)]
pub enum Fault {
    /// The call fails with this error.
    Fail(SinkError),
    /// The call succeeds without reaching the inner sink: only for calls that return nothing
    /// (`EnsureContainer`, `Rename`, `DeletePrefix`); any other panics (a test's mistake).
    Skip,
}

/// The fault hook: `None` forwards the call.
pub type Hook = Arc<dyn Fn(&Call<'_>) -> Option<Fault> + Send + Sync>;

/// A sink forwarding to `inner`, with a fault hook that may be changed while it is used.
pub struct FaultySink {
    inner: Arc<dyn Sink>,
    hook: RwLock<Option<Hook>>,
}

impl FaultySink {
    /// Forwards every call to `inner` until a hook is set.
    pub fn new(inner: Arc<dyn Sink>) -> FaultySink {
        FaultySink {
            inner,
            hook: RwLock::new(None),
        }
    }

    /// Forwards to `inner`, each call first offered to `hook`.
    pub fn with_hook(
        inner: Arc<dyn Sink>,
        hook: impl Fn(&Call<'_>) -> Option<Fault> + Send + Sync + 'static,
    ) -> FaultySink {
        let sink = FaultySink::new(inner);
        sink.set_hook(hook);
        sink
    }

    /// Replaces the fault hook.
    pub fn set_hook(&self, hook: impl Fn(&Call<'_>) -> Option<Fault> + Send + Sync + 'static) {
        *self.hook.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(hook));
    }

    /// Removes the fault hook: every call is forwarded again.
    pub fn clear_hook(&self) {
        *self.hook.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The sink calls are forwarded to.
    pub fn inner(&self) -> &Arc<dyn Sink> {
        &self.inner
    }

    fn fault(&self, call: Call<'_>) -> Option<Fault> {
        let hook = self.hook.read().unwrap_or_else(|p| p.into_inner()).clone();
        hook.and_then(|h| h(&call))
    }

    /// A call that returns nothing: failed, skipped or forwarded.
    fn unit(
        &self,
        call: Call<'_>,
        forward: impl FnOnce() -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        match self.fault(call) {
            Some(Fault::Fail(e)) => Err(e),
            Some(Fault::Skip) => Ok(()),
            None => forward(),
        }
    }

    /// A call that returns a value: failed or forwarded.
    fn value<T>(
        &self,
        call: Call<'_>,
        forward: impl FnOnce() -> Result<T, SinkError>,
    ) -> Result<T, SinkError> {
        match self.fault(call) {
            Some(Fault::Fail(e)) => Err(e),
            Some(Fault::Skip) => panic!("Fault::Skip of a call that returns a value: {call:?}"),
            None => forward(),
        }
    }
}

impl Sink for FaultySink {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn ensure_container(&self, container: &str) -> Result<(), SinkError> {
        self.unit(Call::EnsureContainer { container }, || {
            self.inner.ensure_container(container)
        })
    }
    fn create(&self, container: &str, path: &str) -> Result<Box<dyn PartWriter>, SinkError> {
        self.value(Call::Create { container, path }, || {
            self.inner.create(container, path)
        })
    }
    fn rename(&self, container: &str, from: &str, to: &str) -> Result<(), SinkError> {
        self.unit(
            Call::Rename {
                container,
                from,
                to,
            },
            || self.inner.rename(container, from, to),
        )
    }
    fn delete_prefix(&self, container: &str, prefix: &str) -> Result<(), SinkError> {
        self.unit(Call::DeletePrefix { container, prefix }, || {
            self.inner.delete_prefix(container, prefix)
        })
    }
    fn read_limited(
        &self,
        container: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, String), SinkError> {
        self.value(Call::ReadLimited { container, path }, || {
            self.inner.read_limited(container, path, max_bytes)
        })
    }
    fn open_read(&self, container: &str, path: &str) -> Result<Box<dyn Read + Send>, SinkError> {
        self.value(Call::OpenRead { container, path }, || {
            self.inner.open_read(container, path)
        })
    }
    fn stat(&self, container: &str, path: &str) -> Result<ObjectInfo, SinkError> {
        self.value(Call::Stat { container, path }, || {
            self.inner.stat(container, path)
        })
    }
    fn open_range(
        &self,
        container: &str,
        path: &str,
        range: std::ops::Range<u64>,
        etag: Option<&str>,
    ) -> Result<Box<dyn Read + Send>, SinkError> {
        self.value(Call::OpenRange { container, path }, || {
            self.inner.open_range(container, path, range, etag)
        })
    }
    fn location(&self, container: &str, path: &str) -> String {
        self.inner.location(container, path)
    }
    fn body(&self, container: &str, path: &str) -> Result<FileBody, SinkError> {
        self.value(Call::Body { container, path }, || {
            self.inner.body(container, path)
        })
    }
}
