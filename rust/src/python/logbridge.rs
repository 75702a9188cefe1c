//! Rust `tracing` events → Python `logging`.
//!
//! Installed as the process-wide tracing subscriber when the native module
//! is imported, unless the host (a mixed Rust/Python binary) already set
//! one. Every event goes to the Python logger named after its target, with
//! `::` turned into `.` and put under `dig_service` (so the core's
//! `dig_service::tasks` logs on `dig_service.tasks`). Python's levels are
//! honoured at the time of the event (`isEnabledFor`); nothing is printed
//! by Rust itself. Events are dropped, never blocked on, once the
//! interpreter is finalising.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use super::interop::get_logger;

/// Forwards tracing events to Python logging.
pub(crate) struct LoggingBridge {
    next_span: AtomicU64,
}

/// Install the bridge unless a global subscriber is already set.
pub(crate) fn install() {
    let _ = tracing::subscriber::set_global_default(LoggingBridge {
        next_span: AtomicU64::new(1),
    });
}

fn python_level(level: &Level) -> u32 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

/// The Python logger name for a tracing target.
pub(crate) fn logger_name(target: &str) -> String {
    let dotted = target.replace("::", ".");
    if dotted == "dig_service" || dotted.starts_with("dig_service.") {
        dotted
    } else {
        format!("dig_service.{dotted}")
    }
}

#[derive(Default)]
struct Message {
    text: String,
    fields: String,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.text.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.text, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }
}

impl Subscriber for LoggingBridge {
    fn enabled(&self, _metadata: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        // Relaxed: span ids only need to be distinct, which the modification
        // order of one atomic gives every `fetch_add`; nothing else is
        // published through the counter.
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let level = python_level(meta.level());
        let mut msg = Message::default();
        event.record(&mut msg);
        let line = format!("{}{}", msg.text, msg.fields);
        let name = logger_name(meta.target());
        // Dropped, never blocked on, once the interpreter exits (see
        // `attach_unless_exiting`; `try_attach` alone refuses only on 3.13+).
        let _ = super::attach_unless_exiting(|py| -> PyResult<()> {
            let logger = get_logger(py)?.call1((name,))?;
            if logger
                .call_method1(pyo3::intern!(py, "isEnabledFor"), (level,))?
                .is_truthy()?
            {
                logger.call_method1(pyo3::intern!(py, "log"), (level, "%s", line))?;
            }
            Ok(())
        });
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// Emit a `tracing` event from Rust at `level` (for tests of the bridge).
#[pyfunction]
pub(crate) fn _emit_tracing_event(level: &str, message: &str) -> PyResult<()> {
    let _inside = super::exit::enter()?;
    match level {
        "error" => tracing::error!(target: "dig_service::bridge", "{message}"),
        "warn" => tracing::warn!(target: "dig_service::bridge", "{message}"),
        "info" => tracing::info!(target: "dig_service::bridge", "{message}"),
        "debug" => tracing::debug!(target: "dig_service::bridge", "{message}"),
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "_emit_tracing_event(): `level` must be one of error, warn, info, debug; got {other:?}"
        )))
        }
    }
    Ok(())
}
