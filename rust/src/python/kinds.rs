//! `TaskKind` and `ShutdownReason` as Python classes, and their conversions
//! to and from the core enums.
//!
//! Guarantees:
//! - **Values.** Both are immutable and compare and hash by value;
//!   `match` works on `ShutdownReason` variants (`Fatal(message)`), and a
//!   reason pickles (through `_restore_reason`).
//! - **Lossless.** Every core variant has a Python one and back: a reason
//!   given in Python is the reason Rust sees, and the other way round.
//! - **Checked arguments.** `from_arg` refuses anything but an instance,
//!   with a `TypeError` that names the function and the parameter: the one
//!   `ShutdownReason` check of the bindings.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyString;

use super::interop::{text_arg, wrong_type};
use crate::shutdown::ShutdownReason;
use crate::tasks::TaskKind;

/// What a tracked task is for (observability only).
#[pyclass(
    name = "TaskKind",
    module = "dig_service._core",
    eq,
    eq_int,
    frozen,
    hash
)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum PyTaskKind {
    /// A long-running background loop.
    BackgroundLoop,
    /// A per-peer connection handler.
    PeerConnection,
    /// A per-request RPC handler.
    RpcHandler,
    /// A periodic maintenance job.
    Maintenance,
}

#[pymethods]
impl PyTaskKind {
    fn __repr__(&self) -> String {
        format!("TaskKind.{}", self.name())
    }
}

impl PyTaskKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::BackgroundLoop => "BackgroundLoop",
            Self::PeerConnection => "PeerConnection",
            Self::RpcHandler => "RpcHandler",
            Self::Maintenance => "Maintenance",
        }
    }

    /// A `TaskKind` argument, or a `TypeError` naming `param`.
    #[inline]
    pub(crate) fn from_arg(obj: &Bound<'_, PyAny>, func: &str, param: &str) -> PyResult<TaskKind> {
        match obj.cast::<PyTaskKind>() {
            Ok(k) => Ok((*k.get()).into()),
            Err(_) => Err(wrong_type(
                obj,
                func,
                param,
                "a dig_service.TaskKind (e.g. TaskKind.BackgroundLoop)",
            )),
        }
    }
}

impl From<PyTaskKind> for TaskKind {
    fn from(k: PyTaskKind) -> Self {
        match k {
            PyTaskKind::BackgroundLoop => TaskKind::BackgroundLoop,
            PyTaskKind::PeerConnection => TaskKind::PeerConnection,
            PyTaskKind::RpcHandler => TaskKind::RpcHandler,
            PyTaskKind::Maintenance => TaskKind::Maintenance,
        }
    }
}

impl From<TaskKind> for PyTaskKind {
    fn from(k: TaskKind) -> Self {
        match k {
            TaskKind::BackgroundLoop => PyTaskKind::BackgroundLoop,
            TaskKind::PeerConnection => PyTaskKind::PeerConnection,
            TaskKind::RpcHandler => PyTaskKind::RpcHandler,
            TaskKind::Maintenance => PyTaskKind::Maintenance,
        }
    }
}

/// Why the service is shutting down. Variants compare by value.
#[pyclass(
    name = "ShutdownReason",
    module = "dig_service._core",
    eq,
    frozen,
    hash
)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum PyShutdownReason {
    /// SIGINT / SIGTERM / Ctrl-C.
    UserRequested(),
    /// An admin RPC method requested shutdown.
    RpcRequested(),
    /// A reload was requested.
    ReloadRequested(),
    /// The node's `run` returned by itself.
    RequestedByRun(),
    /// An unrecoverable error, with a message.
    Fatal {
        /// What went wrong.
        message: FatalMessage,
    },
}

/// The text of `ShutdownReason.Fatal(message)`: a `str` that is valid
/// Unicode text. Anything else is refused with an error naming `message`
/// (PyO3's own extraction names neither the class nor the parameter).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FatalMessage(String);

impl FatalMessage {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for FatalMessage {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl From<FatalMessage> for String {
    fn from(message: FatalMessage) -> Self {
        message.0
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for FatalMessage {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let (_, text) = text_arg(&obj, "ShutdownReason.Fatal()", "message")?;
        Ok(Self(text.to_owned()))
    }
}

impl<'py> IntoPyObject<'py> for FatalMessage {
    type Target = PyString;
    type Output = Bound<'py, PyString>;
    type Error = std::convert::Infallible;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        Ok(PyString::new(py, &self.0))
    }
}

impl<'py> IntoPyObject<'py> for &FatalMessage {
    type Target = PyString;
    type Output = Bound<'py, PyString>;
    type Error = std::convert::Infallible;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        Ok(PyString::new(py, &self.0))
    }
}

#[pymethods]
impl PyShutdownReason {
    fn __repr__(&self) -> String {
        self.repr()
    }

    fn __str__(&self) -> String {
        ShutdownReason::from(self.clone()).to_string()
    }

    /// Pickle support: rebuilt through the module-level `_restore_reason`
    /// (the variant classes are not importable by name).
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String, String))> {
        let restore = RESTORE
            .get(py)
            .ok_or_else(|| {
                pyo3::exceptions::PyRuntimeError::new_err(
                    "a ShutdownReason pickles through dig_service._core._restore_reason: \
                     import dig_service._core first",
                )
            })?
            .bind(py)
            .clone();
        let (variant, message) = match self {
            Self::UserRequested() => ("UserRequested", String::new()),
            Self::RpcRequested() => ("RpcRequested", String::new()),
            Self::ReloadRequested() => ("ReloadRequested", String::new()),
            Self::RequestedByRun() => ("RequestedByRun", String::new()),
            Self::Fatal { message } => ("Fatal", message.0.clone()),
        };
        Ok((restore, (variant.to_owned(), message)))
    }
}

/// The module's own `_restore_reason` (what `pickle` finds by name), kept
/// when the module is initialised: `__reduce__` hands it out without
/// importing anything.
static RESTORE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Keep the module `m`'s `_restore_reason` for `__reduce__` (at module init,
/// once `_restore_reason` has been added).
pub(crate) fn remember_restore(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let restore = m.getattr("_restore_reason")?.unbind();
    let _ = RESTORE.set(m.py(), restore);
    Ok(())
}

/// Rebuild a pickled `ShutdownReason`.
#[pyfunction]
pub(crate) fn _restore_reason(variant: &str, message: String) -> PyResult<PyShutdownReason> {
    Ok(match variant {
        "UserRequested" => PyShutdownReason::UserRequested(),
        "RpcRequested" => PyShutdownReason::RpcRequested(),
        "ReloadRequested" => PyShutdownReason::ReloadRequested(),
        "RequestedByRun" => PyShutdownReason::RequestedByRun(),
        "Fatal" => PyShutdownReason::Fatal {
            message: FatalMessage(message),
        },
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "_restore_reason(): unknown ShutdownReason variant `variant` {other:?}"
            )))
        }
    })
}

impl PyShutdownReason {
    pub(crate) fn repr(&self) -> String {
        match self {
            Self::UserRequested() => "ShutdownReason.UserRequested()".into(),
            Self::RpcRequested() => "ShutdownReason.RpcRequested()".into(),
            Self::ReloadRequested() => "ShutdownReason.ReloadRequested()".into(),
            Self::RequestedByRun() => "ShutdownReason.RequestedByRun()".into(),
            Self::Fatal { message } => format!("ShutdownReason.Fatal(message={:?})", message.0),
        }
    }

    /// A `ShutdownReason` argument, or a `TypeError` naming `param`.
    pub(crate) fn from_arg(
        obj: &Bound<'_, PyAny>,
        func: &str,
        param: &str,
    ) -> PyResult<ShutdownReason> {
        match obj.cast::<PyShutdownReason>() {
            Ok(r) => Ok(r.get().clone().into()),
            Err(_) => Err(wrong_type(
                obj,
                func,
                param,
                "a dig_service.ShutdownReason (e.g. ShutdownReason.UserRequested())",
            )),
        }
    }
}

impl From<PyShutdownReason> for ShutdownReason {
    fn from(r: PyShutdownReason) -> Self {
        match r {
            PyShutdownReason::UserRequested() => ShutdownReason::UserRequested,
            PyShutdownReason::RpcRequested() => ShutdownReason::RpcRequested,
            PyShutdownReason::ReloadRequested() => ShutdownReason::ReloadRequested,
            PyShutdownReason::RequestedByRun() => ShutdownReason::RequestedByRun,
            PyShutdownReason::Fatal { message } => ShutdownReason::Fatal(message.0),
        }
    }
}

impl From<ShutdownReason> for PyShutdownReason {
    fn from(r: ShutdownReason) -> Self {
        match r {
            ShutdownReason::UserRequested => PyShutdownReason::UserRequested(),
            ShutdownReason::RpcRequested => PyShutdownReason::RpcRequested(),
            ShutdownReason::ReloadRequested => PyShutdownReason::ReloadRequested(),
            ShutdownReason::RequestedByRun => PyShutdownReason::RequestedByRun(),
            ShutdownReason::Fatal(message) => PyShutdownReason::Fatal {
                message: FatalMessage(message),
            },
        }
    }
}
