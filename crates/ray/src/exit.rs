//! Exit codes scripts can rely on.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | any other failure |
//! | 2 | bad command line (clap) |
//! | 3 | no such VM |
//! | 4 | refused: the VM's state does not allow it (HTTP 409), or not available (501) |
//! | 5 | the VMM cannot be reached (dead or not answering) |
//! | 6 | the request was invalid (HTTP 400) |
use crate::client::ClientError;

pub const NOT_FOUND: u8 = 3;
pub const REFUSED: u8 = 4;
pub const UNREACHABLE: u8 = 5;
pub const INVALID: u8 = 6;

/// An error that carries its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub code: u8,
    pub message: String,
}

pub fn coded(code: u8, message: impl Into<String>) -> anyhow::Error {
    Coded {
        code,
        message: message.into(),
    }
    .into()
}

pub fn code_of(e: &anyhow::Error) -> u8 {
    if let Some(c) = e.downcast_ref::<Coded>() {
        return c.code;
    }
    // `ray vmm`: why the VMM did not get its VM running.
    if let Some(s) = e.downcast_ref::<ray_vmm::StartError>() {
        use ray_vmm::controller::ControllerError as C;
        return match s {
            ray_vmm::StartError::Locked(_) => REFUSED,
            ray_vmm::StartError::Controller(C::Invalid(_)) => INVALID,
            ray_vmm::StartError::Controller(C::Refused(_) | C::Busy(_)) => REFUSED,
            ray_vmm::StartError::Controller(C::NotFound(_)) => NOT_FOUND,
            ray_vmm::StartError::Controller(C::Failed(_)) => 1,
        };
    }
    // What `ray` could not hand a jailed VMM.
    if let Some(h) = e.downcast_ref::<ray_vmm::hand_over::HandOverError>() {
        use ray_vmm::hand_over::Failure;
        return match h.failure {
            Failure::Invalid => INVALID,
            Failure::Unreachable => UNREACHABLE,
            Failure::Refused => REFUSED,
            Failure::Failed => 1,
        };
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { .. }) => UNREACHABLE,
        Some(ClientError::Api {
            status: 409 | 501, ..
        }) => REFUSED,
        Some(ClientError::Api { status: 400, .. }) => INVALID,
        Some(ClientError::Api { status: 404, .. }) => NOT_FOUND,
        _ => 1,
    }
}
