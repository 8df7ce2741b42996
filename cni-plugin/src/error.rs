//! CNI errors: the spec's codes and the JSON a runtime shows to its user.

use serde::Serialize;

/// The error codes of the CNI specification (section "Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the runtime asked for a CNI version we do not support.
    IncompatibleVersion,
    /// 2: a field in the network config is not supported.
    UnsupportedField,
    /// 3: the container is unknown or does not exist.
    UnknownContainer,
    /// 4: a required environment variable is missing or invalid.
    InvalidEnvironment,
    /// 5: an I/O failure.
    Io,
    /// 6: the network config (or prevResult) could not be decoded.
    Decode,
    /// 7: the network config is invalid.
    InvalidConfig,
    /// 11: a transient condition; the runtime should retry later.
    TryAgainLater,
    /// 50: STATUS: the plugin cannot serve ADD requests now.
    NotAvailable,
    /// 100: any other failure of this plugin (netlink, IPAM, CHECK mismatch).
    Plugin,
    /// A code of a delegated plugin that is none of the above (its own
    /// plugin-specific code), passed on unchanged.
    Other(u32),
}

impl ErrorCode {
    /// The numeric code on the wire.
    pub fn code(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnsupportedField => 2,
            Self::UnknownContainer => 3,
            Self::InvalidEnvironment => 4,
            Self::Io => 5,
            Self::Decode => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::NotAvailable => 50,
            Self::Plugin => 100,
            Self::Other(code) => code,
        }
    }

    /// The code for a number on the wire (a delegate's error): the named
    /// code when there is one, else [`ErrorCode::Other`]; 0, which is no
    /// error code, is [`ErrorCode::Plugin`].
    pub fn from_code(code: u32) -> Self {
        const NAMED: [ErrorCode; 10] = [
            ErrorCode::IncompatibleVersion,
            ErrorCode::UnsupportedField,
            ErrorCode::UnknownContainer,
            ErrorCode::InvalidEnvironment,
            ErrorCode::Io,
            ErrorCode::Decode,
            ErrorCode::InvalidConfig,
            ErrorCode::TryAgainLater,
            ErrorCode::NotAvailable,
            ErrorCode::Plugin,
        ];
        match code {
            0 => Self::Plugin,
            _ => NAMED
                .into_iter()
                .find(|named| named.code() == code)
                .unwrap_or(Self::Other(code)),
        }
    }
}

/// A failed CNI call: printed as the spec's error JSON on stdout, exit 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The spec's error code.
    pub code: ErrorCode,
    /// A short message a person can act on.
    pub msg: String,
    /// More context (the underlying error), may be empty.
    pub details: String,
}

impl CniError {
    /// An error with a message and no details.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds the underlying cause as `details`.
    pub fn with_details(mut self, details: impl ToString) -> Self {
        self.details = details.to_string();
        self
    }

    /// A plugin-specific failure (code 100).
    pub fn plugin(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Plugin, msg)
    }

    /// The error JSON, in the result format of `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version,
            code: self.code.code(),
            msg: &self.msg,
            details: &self.details,
        };
        // Serializing strings and integers cannot fail; keep a fallback anyway.
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{cni_version}","code":{},"msg":"unprintable error"}}"#,
                self.code.code()
            )
        })
    }
}

/// Shorthand for results of CNI operations.
pub type CniResult<T> = Result<T, CniError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(ErrorCode::TryAgainLater, "no subnet.env").with_details("ENOENT");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "no subnet.env");
        assert_eq!(v["details"], "ENOENT");
        let bare = CniError::plugin("x").to_json("0.4.0");
        assert!(!bare.contains("details"), "{bare}");
    }
}
