//! The `flannel` CNI plugin.
//!
//! Not implemented yet (the CNI plugin issue builds it). Until then it answers
//! every call with a CNI error, so a runtime reports a clear message instead
//! of a half-configured container.

use std::process::ExitCode;

fn main() -> ExitCode {
    // CNI error code 4: "invalid necessary environment variables" is not
    // right, so use the generic plugin-specific range (>= 100).
    let message = "the flannel CNI plugin is not implemented yet";
    println!(r#"{{"cniVersion":"1.1.0","code":100,"msg":"{message}"}}"#);
    ExitCode::FAILURE
}
