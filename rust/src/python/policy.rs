//! `Restart` and `RestartPolicy` for Python: the core's restart policy
//! behind Python classes (SPEC 8).
//!
//! Guarantees:
//! - **Checked at construction.** Every field is checked when the policy is
//!   made, with an exception that names the field and says what was given:
//!   a wrong type is a `TypeError`; a negative, NaN or infinite duration, a
//!   zero `within`, a negative `max_restarts` or a `backoff` above
//!   `max_backoff` is a `ValueError`. A policy that exists is valid, so
//!   `supervise` never refuses one later.
//! - **Values.** Both are immutable and compare by value; a policy reads
//!   back exactly the numbers it was given (durations as float seconds).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};

use super::interop::{duration, not_a_bool, seconds_arg, wrong_type};
use crate::tasks::{Restart, RestartPolicy};

/// When a supervised task is restarted.
#[pyclass(
    name = "Restart",
    module = "dig_service._core",
    eq,
    eq_int,
    frozen,
    hash
)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum PyRestart {
    /// Restarted whenever it ends (returns or raises) while the service runs.
    Permanent,
    /// Restarted only when it raises.
    Transient,
    /// Never restarted.
    Temporary,
}

#[pymethods]
impl PyRestart {
    fn __repr__(&self) -> &'static str {
        match self {
            Self::Permanent => "Restart.Permanent",
            Self::Transient => "Restart.Transient",
            Self::Temporary => "Restart.Temporary",
        }
    }
}

impl From<PyRestart> for Restart {
    fn from(r: PyRestart) -> Self {
        match r {
            PyRestart::Permanent => Restart::Permanent,
            PyRestart::Transient => Restart::Transient,
            PyRestart::Temporary => Restart::Temporary,
        }
    }
}

/// How a supervised task is restarted, and when it gives up.
#[pyclass(name = "RestartPolicy", module = "dig_service._core", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyRestartPolicy {
    /// The policy as the core applies it.
    pub(crate) core: RestartPolicy,
    restart: PyRestart,
    within: f64,
    backoff: f64,
    max_backoff: f64,
}

impl Default for PyRestartPolicy {
    fn default() -> Self {
        let core = RestartPolicy::default();
        Self {
            restart: PyRestart::Permanent,
            within: core.within.as_secs_f64(),
            backoff: core.backoff.as_secs_f64(),
            max_backoff: core.max_backoff.as_secs_f64(),
            core,
        }
    }
}

const FUNC: &str = "RestartPolicy()";

#[pymethods]
impl PyRestartPolicy {
    #[new]
    #[pyo3(
        signature = (restart = None, max_restarts = None, within = None, backoff = None, max_backoff = None, critical = None),
        text_signature = "(restart=Restart.Permanent, max_restarts=5, within=60.0, backoff=0.1, max_backoff=30.0, critical=True)"
    )]
    fn new(
        restart: Option<&Bound<'_, PyAny>>,
        max_restarts: Option<&Bound<'_, PyAny>>,
        within: Option<&Bound<'_, PyAny>>,
        backoff: Option<&Bound<'_, PyAny>>,
        max_backoff: Option<&Bound<'_, PyAny>>,
        critical: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mut p = Self::default();
        if let Some(obj) = restart {
            p.restart = *obj
                .cast::<PyRestart>()
                .map_err(|_| {
                    wrong_type(
                        obj,
                        FUNC,
                        "restart",
                        "a dig_service.Restart (e.g. Restart.Transient)",
                    )
                })?
                .get();
            p.core.restart = p.restart.into();
        }
        if let Some(obj) = max_restarts {
            p.core.max_restarts = count_arg(obj, "max_restarts")?;
        }
        if let Some(obj) = within {
            let secs = seconds_arg(obj, FUNC, "within")?;
            if secs == 0.0 {
                return Err(PyValueError::new_err(format!(
                    "{FUNC}: `within` must be a finite number of seconds > 0 (the window that \
                     restarts are counted in), got {secs}"
                )));
            }
            p.within = secs;
            p.core.within = duration(secs);
        }
        if let Some(obj) = backoff {
            p.backoff = seconds_arg(obj, FUNC, "backoff")?;
            p.core.backoff = duration(p.backoff);
        }
        if let Some(obj) = max_backoff {
            p.max_backoff = seconds_arg(obj, FUNC, "max_backoff")?;
            p.core.max_backoff = duration(p.max_backoff);
        }
        if p.backoff > p.max_backoff {
            return Err(PyValueError::new_err(format!(
                "{FUNC}: `backoff` ({} s) must not be larger than `max_backoff` ({} s)",
                p.backoff, p.max_backoff
            )));
        }
        if let Some(obj) = critical {
            p.core.critical = obj
                .cast::<PyBool>()
                .map_err(|_| not_a_bool(obj, FUNC, "critical"))?
                .is_true();
        }
        // Everything the core checks was checked above, field by field.
        debug_assert!(p.core.validate().is_ok());
        Ok(p)
    }

    /// Which ends are restarted.
    #[getter]
    fn restart(&self) -> PyRestart {
        self.restart
    }

    /// How many restarts `within` seconds are allowed; one more gives up.
    #[getter]
    fn max_restarts(&self) -> u32 {
        self.core.max_restarts
    }

    /// The intensity window, in seconds.
    #[getter]
    fn within(&self) -> f64 {
        self.within
    }

    /// The first restart's delay, in seconds.
    #[getter]
    fn backoff(&self) -> f64 {
        self.backoff
    }

    /// The longest delay before a restart, in seconds.
    #[getter]
    fn max_backoff(&self) -> f64 {
        self.max_backoff
    }

    /// Whether giving up shuts the service down (`ShutdownReason.Fatal`).
    #[getter]
    fn critical(&self) -> bool {
        self.core.critical
    }

    fn __repr__(&self) -> String {
        format!(
            "RestartPolicy(restart={}, max_restarts={}, within={:?}, backoff={:?}, \
             max_backoff={:?}, critical={})",
            self.restart.__repr__(),
            self.core.max_restarts,
            self.within,
            self.backoff,
            self.max_backoff,
            if self.core.critical { "True" } else { "False" }
        )
    }
}

/// `max_restarts`: an `int` (not a `bool`) from 0 to 2**32 - 1.
fn count_arg(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<u32> {
    if !obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyBool>() {
        return Err(wrong_type(obj, FUNC, param, "an int"));
    }
    obj.extract::<u32>().map_err(|_| {
        PyValueError::new_err(format!(
            "{FUNC}: `{param}` must be an int from 0 to {}, got {}",
            u32::MAX,
            obj.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })
}
