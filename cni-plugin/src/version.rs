//! CNI spec versions: which we speak and how results differ between them.

use crate::error::{CniError, CniResult, ErrorCode};

/// The versions this plugin accepts in a config and can produce results in.
/// 0.1.0 and 0.2.0 use a different result shape that no current runtime asks for.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used when nothing else is known (e.g. unparsable stdin).
pub const LATEST: &str = "1.1.0";

/// A supported CNI version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// 0.3.0
    V0_3_0,
    /// 0.3.1
    V0_3_1,
    /// 0.4.0: adds CHECK and prevResult on DEL.
    V0_4_0,
    /// 1.0.0: drops `version` from IP configs.
    V1_0_0,
    /// 1.1.0: adds GC, STATUS and interface MTU in results.
    V1_1_0,
}

impl Version {
    /// Parses a `cniVersion` string; an unsupported one is error code 1.
    pub fn parse(s: &str) -> CniResult<Self> {
        match s {
            "0.3.0" => Ok(Self::V0_3_0),
            "0.3.1" => Ok(Self::V0_3_1),
            "0.4.0" => Ok(Self::V0_4_0),
            "1.0.0" => Ok(Self::V1_0_0),
            "1.1.0" => Ok(Self::V1_1_0),
            other => Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "unsupported cniVersion {other:?}; this plugin supports {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            )),
        }
    }

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Results before 1.0.0 carry `"version":"4"` in every IP config.
    pub fn ip_configs_have_version(self) -> bool {
        self < Self::V1_0_0
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// Interface MTU in results exists from 1.1.0 on.
    pub fn has_interface_mtu(self) -> bool {
        self >= Self::V1_1_0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_round_trips() {
        for s in SUPPORTED_VERSIONS {
            assert_eq!(Version::parse(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn unsupported_versions_are_error_code_1_naming_the_version() {
        for s in ["0.1.0", "0.2.0", "2.0.0", "", "1.0"] {
            let e = Version::parse(s).unwrap_err();
            assert_eq!(e.code, ErrorCode::IncompatibleVersion);
            assert!(e.msg.contains(&format!("{s:?}")), "{}", e.msg);
        }
    }
}
