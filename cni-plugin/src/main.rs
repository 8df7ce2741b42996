//! The `flannel` CNI plugin binary: reads the CNI environment and stdin,
//! prints the result or a CNI error JSON, exits 0 or 1.

use std::io::{Read, Write};
use std::process::ExitCode;

/// Larger stdin is refused rather than read into memory.
const MAX_STDIN: u64 = 16 << 20;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let outcome = match read {
        Ok(n) if n as u64 > MAX_STDIN => cni_plugin::Outcome {
            stdout: cni_plugin::error::CniError::new(
                cni_plugin::error::ErrorCode::Decode,
                format!("the network config on stdin is larger than {MAX_STDIN} bytes"),
            )
            .to_json(cni_plugin::version::LATEST),
            success: false,
        },
        Ok(_) => cni_plugin::run(|k| std::env::var(k).ok(), &stdin),
        Err(e) => cni_plugin::Outcome {
            stdout: cni_plugin::error::CniError::new(
                cni_plugin::error::ErrorCode::Io,
                "cannot read the network config from stdin",
            )
            .with_details(e)
            .to_json(cni_plugin::version::LATEST),
            success: false,
        },
    };
    let mut out = std::io::stdout().lock();
    // If stdout is gone the runtime is gone too; the exit code still tells.
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
