//! Errors of the control API and the one place they become HTTP status codes.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::DeviceId;

/// Everything an API call can end in besides success. The VMM's [`ApiHandler`] returns the
/// variants from [`ApiError::InvalidRequest`] on; the HTTP layer produces the others.
///
/// [`ApiHandler`]: crate::api::ApiHandler
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ApiError {
    /// The request is not valid HTTP, JSON or not what the endpoint takes.
    #[error("{0}")]
    BadRequest(String),
    /// No endpoint at this path.
    #[error("no endpoint {path} (see docs/api.yaml)")]
    UnknownPath {
        /// The requested path.
        path: String,
    },
    /// The endpoint exists but not with this method.
    #[error("{path} does not take {method}; use {allowed}")]
    MethodNotAllowed {
        /// The requested method.
        method: String,
        /// The requested path.
        path: String,
        /// The method the endpoint takes.
        allowed: &'static str,
    },
    /// The client did not send its request in time.
    #[error("the request did not arrive within {limit_ms} ms")]
    RequestTimeout {
        /// The limit.
        limit_ms: u64,
    },
    /// A body without a Content-Length.
    #[error(
        "a request body needs a Content-Length header (chunked request bodies are not supported)"
    )]
    LengthRequired,
    /// The body is larger than the server takes.
    #[error("the request body of {length} bytes is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Bytes announced by Content-Length.
        length: u64,
        /// The limit.
        limit: usize,
    },
    /// The request line and headers are larger than the server takes.
    #[error("the request line and headers are larger than the limit of {limit} bytes")]
    HeadersTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The request is valid but not for this VM (e.g. an unusable value).
    #[error("{0}")]
    InvalidRequest(String),
    /// No device with this id.
    #[error("no device with id '{id}'")]
    UnknownDevice {
        /// The id asked for.
        id: DeviceId,
    },
    /// The request conflicts with the VM's state: id taken, device busy, no free slot, a
    /// hotplug in progress.
    #[error("{0}")]
    Conflict(String),
    /// The VMM failed.
    #[error("{0}")]
    Internal(String),
    /// The VMM cannot take the request now (shutting down, too many connections).
    #[error("{0}")]
    Unavailable(String),
    /// The operation did not finish in time; `step` says where it stopped.
    #[error("timed out after {after_ms} ms while {step}")]
    Timeout {
        /// What was being waited for, e.g. "waiting for the guest to power the slot on".
        step: String,
        /// How long it waited.
        after_ms: u64,
    },
}

impl ApiError {
    /// The HTTP status code of this error: the single mapping from error kinds to statuses.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidRequest(_) => 400,
            ApiError::UnknownPath { .. } | ApiError::UnknownDevice { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::RequestTimeout { .. } => 408,
            ApiError::Conflict(_) => 409,
            ApiError::LengthRequired => 411,
            ApiError::PayloadTooLarge { .. } => 413,
            ApiError::HeadersTooLarge { .. } => 431,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
            ApiError::Timeout { .. } => 504,
        }
    }

    /// The JSON body that carries this error to the client.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            step: match self {
                ApiError::Timeout { step, .. } => Some(step.clone()),
                _ => None,
            },
        }
    }
}

/// The body of every error response: `{"error": "message"}`, plus `step` on a timeout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, as a sentence for a person.
    pub error: String,
    /// Where a timed-out operation stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_device_maps_to_404() {
        let id = DeviceId::new("nvme0").expect("valid id");
        assert_eq!(ApiError::UnknownDevice { id }.status(), 404);
    }

    #[test]
    fn conflict_maps_to_409() {
        assert_eq!(ApiError::Conflict("slot busy".into()).status(), 409);
    }

    #[test]
    fn unavailable_maps_to_503_and_timeout_to_504() {
        assert_eq!(ApiError::Unavailable("stopping".into()).status(), 503);
        let timeout = ApiError::Timeout {
            step: "waiting".into(),
            after_ms: 1,
        };
        assert_eq!(timeout.status(), 504);
    }

    #[test]
    fn timeout_body_names_the_step() {
        let body = ApiError::Timeout {
            step: "waiting for the guest to power the slot on".into(),
            after_ms: 30000,
        }
        .body();
        assert_eq!(
            body.error,
            "timed out after 30000 ms while waiting for the guest to power the slot on"
        );
        assert_eq!(
            body.step.as_deref(),
            Some("waiting for the guest to power the slot on")
        );
    }

    #[test]
    fn plain_error_body_has_only_the_message() {
        let json =
            serde_json::to_string(&ApiError::Internal("boom".into()).body()).expect("serializable");
        assert_eq!(json, r#"{"error":"boom"}"#);
    }
}
