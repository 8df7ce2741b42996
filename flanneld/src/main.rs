//! `flanneld`: the flannel-compatible overlay network daemon.
//!
//! Only `--version` works so far: the daemon itself (flags, interface
//! selection, backends, health) is built by the VXLAN issue on top of the
//! `subnet` crate. Anything else exits 1 and says so, rather than pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-version") {
        // flannel prints its version to stderr.
        eprintln!("{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!("flanneld: the daemon is not implemented yet; only --version works");
    ExitCode::FAILURE
}
