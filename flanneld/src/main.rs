//! `flanneld`: the flannel-compatible overlay network daemon.
//!
//! Flags as flannel's (see [`flags`]); exit codes as flannel's: 0 after
//! SIGTERM/SIGINT (everything is left in place), 1 for bad flags and for
//! failures to start or to keep a lease.

mod daemon;
mod firewall;
mod flags;
mod health;
mod iface;

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let flags = match flags::parse(std::env::args_os()) {
        Ok(flags::Command::Run(flags)) => flags,
        Ok(flags::Command::Version) => {
            // flannel prints its version to stderr.
            eprintln!("{}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(flags::Command::Help(text)) => {
            eprint!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("flanneld: {error}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(flags.verbosity);
    // One thread: flanneld is a control plane (the kernel moves the packets),
    // and every extra thread costs stack and a malloc arena.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flanneld: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(*flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbosity: u8) {
    let default = match verbosity {
        0 => "info",
        1..=4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
