//! What every layer of the balancer fails with: a boxed error (a
//! `tonic::Status` or a transport error), and the one status a passed
//! deadline gives, wherever it passed.

/// The error type of the balancer's `Service` impl, as tonic's `Channel`.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error a call fails with when its deadline passes.
pub(crate) fn deadline_exceeded(what: std::fmt::Arguments<'_>) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("deadline exceeded {what}"))
}
