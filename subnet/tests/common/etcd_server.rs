//! A real etcd 3.4 server (Debian package `etcd-server`, binary `etcd`) for tests.
//!
//! Every server listens on `127.0.0.1` with free client and peer ports and keeps its data in a
//! fresh temporary directory that is removed when the [`EtcdServer`] is dropped. Only the child
//! process this module started is ever signalled, and only by its own PID while it has not been
//! reaped yet (so the PID cannot have been reused). Every wait has a timeout.
//!
//! Missing binaries or a server that does not come up make the test panic with a clear message
//! and the tail of etcd's log: tests fail loudly, they never skip.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// The etcd server binary (Debian package `etcd-server`).
pub(crate) const ETCD_BIN: &str = "etcd";
/// The etcd client binary (Debian package `etcd-client`).
pub(crate) const ETCDCTL_BIN: &str = "etcdctl";

/// How long a (re)started server may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a child to be reaped after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of the `kill -TERM` helper command.
const KILL_CMD_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one [`EtcdServer::etcdctl`] invocation.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of one HTTP probe (connect, write, read).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many times `start` picks new ports when etcd reports "address already in use".
const PORT_ATTEMPTS: usize = 3;
/// How many bytes of etcd's log a panic message shows.
const LOG_TAIL_BYTES: u64 = 4000;

/// Makes member names unique among the servers of one test process.
static SERVER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running (or stopped) single-member etcd 3.4 server owned by a test.
#[derive(Debug)]
pub(crate) struct EtcdServer {
    /// The etcd child process, `None` while stopped.
    child: Mutex<Option<Child>>,
    /// Root of the scratch directory (data dir and log file); removed on drop.
    root: tempfile::TempDir,
    /// etcd's `--data-dir`, kept across `stop`/`restart`.
    data_dir: PathBuf,
    /// Log file that receives etcd's stdout and stderr (appended across restarts).
    log_path: PathBuf,
    /// etcd's `--name`, unique per server, used to tell our server from another on the port.
    name: String,
    /// Client port on 127.0.0.1.
    client_port: u16,
    /// Peer port on 127.0.0.1.
    peer_port: u16,
    /// Caller-supplied extra flags, passed again on every restart.
    extra_args: Vec<String>,
    /// With TLS: the directory holding `ca.pem`, `server.pem` and
    /// `server-key.pem`, and the plain-HTTP metrics port used to probe health.
    tls: Option<(PathBuf, u16)>,
}

/// Why one attempt to bring etcd up failed.
#[derive(Debug)]
enum StartError {
    /// etcd could not bind one of its ports (someone else took it): retry with new ports.
    AddressInUse(String),
    /// Anything else: give up.
    Other(String),
}

impl EtcdServer {
    /// Starts etcd on 127.0.0.1 with free client and peer ports and a fresh temporary data dir,
    /// and waits (at most 20 s) until it serves requests.
    ///
    /// # Panics
    /// If the `etcd` binary is missing or the server does not come up.
    pub(crate) fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Like [`EtcdServer::start`], with extra etcd flags (for example
    /// `--auto-compaction-retention=1`). The flags are passed again on every restart.
    ///
    /// # Panics
    /// If the `etcd` binary is missing or the server does not come up.
    pub(crate) fn start_with_args(extra: &[&str]) -> Self {
        Self::start_inner(extra, None)
    }

    /// Starts etcd serving clients over TLS only, requiring client
    /// certificates signed by `certs/ca.pem` (server certificate
    /// `certs/server.pem`, key `certs/server-key.pem`).
    pub(crate) fn start_tls(certs: &Path) -> Self {
        Self::start_inner(&[], Some(certs.to_owned()))
    }

    fn start_inner(extra: &[&str], tls: Option<PathBuf>) -> Self {
        let root = tempfile::Builder::new()
            .prefix("subnet-etcd-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory for etcd: {e}"));
        let data_dir = root.path().join("data");
        let log_path = root.path().join("etcd.log");
        let name = format!(
            "subnet-test-{}-{}",
            std::process::id(),
            SERVER_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut server = Self {
            child: Mutex::new(None),
            root,
            data_dir,
            log_path,
            name,
            client_port: 0,
            peer_port: 0,
            extra_args: extra.iter().map(|s| (*s).to_owned()).collect(),
            tls: None,
        };

        let mut clashes = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let (client_port, peer_port) = free_port_pair();
            server.client_port = client_port;
            server.peer_port = peer_port;
            if let Some(dir) = &tls {
                server.tls = Some((dir.clone(), free_port_pair().0));
            }
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(StartError::AddressInUse(msg)) => {
                    // Start over with an empty data dir: the member's peer URL is recorded in it.
                    if server.data_dir.exists() {
                        std::fs::remove_dir_all(&server.data_dir).unwrap_or_else(|e| {
                            panic!("cannot remove {}: {e}", server.data_dir.display())
                        });
                    }
                    clashes.push(msg);
                }
                Err(StartError::Other(msg)) => panic!("{msg}"),
            }
        }
        panic!(
            "etcd could not bind free ports in {PORT_ATTEMPTS} attempts:\n{}",
            clashes.join("\n")
        );
    }

    /// The client URL, `http://127.0.0.1:<port>`.
    pub(crate) fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client address, `127.0.0.1:<port>`.
    pub(crate) fn client_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// The client port on 127.0.0.1.
    pub(crate) fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The peer URL, `http://127.0.0.1:<port>`.
    pub(crate) fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// etcd's data directory (kept across `stop` and `restart`).
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file that receives etcd's output.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last few KiB of etcd's log, for diagnostics.
    pub(crate) fn log_tail(&self) -> String {
        read_log_tail(&self.log_path, 0)
    }

    /// Stops the server: SIGTERM to its own PID, wait up to 10 s, then SIGKILL. The data dir
    /// and the ports are kept for [`EtcdServer::restart`]. Does nothing if already stopped.
    pub(crate) fn stop(&mut self) {
        let child = self.lock_child().take();
        if let Some(child) = child {
            terminate(child);
        }
    }

    /// Starts the server again on the same data dir and ports (after [`EtcdServer::stop`]) and
    /// waits (at most 20 s) until it serves requests.
    ///
    /// # Panics
    /// If the server is still running or does not come up.
    pub(crate) fn restart(&mut self) {
        assert!(
            self.lock_child().is_none(),
            "EtcdServer::restart called while etcd is still running; call stop() first"
        );
        match self.spawn_and_wait() {
            Ok(()) => {}
            Err(StartError::AddressInUse(msg) | StartError::Other(msg)) => {
                panic!("etcd did not restart on the same ports: {msg}")
            }
        }
    }

    /// Whether our etcd process is alive (started and not exited).
    pub(crate) fn is_running(&self) -> bool {
        let mut guard = self.lock_child();
        match guard.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// Runs `etcdctl --endpoints=<this server> <args>` (API v3) with a 15 s timeout and returns
    /// its output. Does not check the exit status.
    ///
    /// # Panics
    /// If `etcdctl` is missing or does not finish in time.
    pub(crate) fn etcdctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(ETCDCTL_BIN);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--dial-timeout=3s")
            .arg("--command-timeout=10s")
            .args(args);
        run_with_timeout(cmd, ETCDCTL_TIMEOUT).unwrap_or_else(|e| {
            panic!("etcdctl {args:?}: {e} (install Debian package etcd-client)")
        })
    }

    /// Like [`EtcdServer::etcdctl`] but panics unless it exits successfully; returns stdout.
    ///
    /// # Panics
    /// If `etcdctl` fails.
    pub(crate) fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Locks the child slot, tolerating a poisoned mutex (a test thread panicked).
    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Spawns etcd with the current ports and waits until it is ready. On failure the child
    /// (if any) has been stopped again.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        // Where this run's output starts in the (appended) log file.
        let log_offset = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| {
                StartError::Other(format!("cannot open {}: {e}", self.log_path.display()))
            })?;
        let log_err = log.try_clone().map_err(|e| {
            StartError::Other(format!("cannot dup {}: {e}", self.log_path.display()))
        })?;

        let client_url = self.endpoint();
        let peer_url = self.peer_url();
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", self.name))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .args(&self.extra_args)
            .args(self.tls_args())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StartError::Other(format!(
                    "cannot run `{ETCD_BIN}`: not found in PATH; install Debian package \
                     etcd-server (netns-tests/scripts/setup.sh does it)"
                ))
            } else {
                StartError::Other(format!("cannot run `{ETCD_BIN}`: {e}"))
            }
        })?;
        *self.lock_child() = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // First: has our process died (e.g. it could not bind a port)?
            let exited = {
                let mut guard = self.lock_child();
                match guard.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        guard.take();
                        Some(Ok(status))
                    }
                    Some(Err(e)) => Some(Err(e)),
                    _ => None,
                }
            };
            match exited {
                Some(Ok(status)) => return Err(self.exit_error(status, log_offset)),
                Some(Err(e)) => {
                    self.stop();
                    return Err(StartError::Other(format!(
                        "cannot query etcd's status: {e}"
                    )));
                }
                None => {}
            }
            // Second: does the server on our port answer, and is it ours (by member name)?
            if self.probe_ready() && self.is_running() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                let tail = read_log_tail(&self.log_path, log_offset);
                if tail.contains("address already in use") {
                    return Err(StartError::AddressInUse(format!(
                        "etcd on {} (peer {}) hit a port clash:\n{tail}",
                        self.endpoint(),
                        self.peer_url()
                    )));
                }
                return Err(StartError::Other(format!(
                    "etcd on {} did not become healthy within {START_TIMEOUT:?}; \
                     log tail ({}):\n{tail}",
                    self.endpoint(),
                    self.log_path.display()
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Error for an etcd process that exited during startup.
    fn exit_error(&self, status: ExitStatus, log_offset: u64) -> StartError {
        let tail = read_log_tail(&self.log_path, log_offset);
        let msg = format!(
            "etcd (client {}, peer {}) exited during startup with {status}; log tail ({}):\n{tail}",
            self.endpoint(),
            self.peer_url(),
            self.log_path.display()
        );
        if tail.contains("address already in use") {
            StartError::AddressInUse(msg)
        } else {
            StartError::Other(msg)
        }
    }

    /// etcd's TLS flags, if serving over TLS.
    fn tls_args(&self) -> Vec<String> {
        let Some((dir, metrics_port)) = &self.tls else {
            return Vec::new();
        };
        let file = |name: &str| dir.join(name).display().to_string();
        vec![
            format!("--cert-file={}", file("server.pem")),
            format!("--key-file={}", file("server-key.pem")),
            format!("--trusted-ca-file={}", file("ca.pem")),
            "--client-cert-auth".to_owned(),
            format!("--listen-metrics-urls=http://127.0.0.1:{metrics_port}"),
        ]
    }

    /// One readiness probe: `/health` says `"health":"true"` and the member list (v3 gateway)
    /// names our member, so another etcd that grabbed the port is not mistaken for ours.
    /// Over TLS only the plain metrics listener's `/health` is probed.
    fn probe_ready(&self) -> bool {
        if let Some((_, metrics_port)) = &self.tls {
            let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, *metrics_port));
            return http_request(metrics, "GET", "/health", "")
                .is_some_and(|body| body.contains("\"health\":\"true\""));
        }
        let addr = self.client_addr();
        let healthy = http_request(addr, "GET", "/health", "")
            .is_some_and(|body| body.contains("\"health\":\"true\""));
        healthy
            && http_request(addr, "POST", "/v3/cluster/member/list", "{}")
                .is_some_and(|body| body.contains(&format!("\"name\":\"{}\"", self.name)))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let child = self.lock_child().take();
        if let Some(mut child) = child {
            if thread::panicking() {
                eprintln!(
                    "etcd {} log tail ({}):\n{}",
                    self.endpoint(),
                    self.log_path.display(),
                    self.log_tail()
                );
            }
            // Not reaped yet, so the PID is still our child's: SIGKILL it and reap it.
            let _ = child.kill();
            let _ = wait_timeout(&mut child, KILL_TIMEOUT);
        }
        // `root` (TempDir) removes the data dir and the log afterwards.
    }
}

/// Two distinct free TCP ports on 127.0.0.1 (both listeners are held at the same time so the
/// kernel cannot hand out the same port twice, then released for etcd).
fn free_port_pair() -> (u16, u16) {
    let bind = || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"))
    };
    let a = bind();
    let b = bind();
    let port = |l: &TcpListener| {
        l.local_addr()
            .unwrap_or_else(|e| panic!("cannot read a listener's address: {e}"))
            .port()
    };
    (port(&a), port(&b))
}

/// Sends SIGTERM to our (unreaped) child, waits up to [`STOP_TIMEOUT`], then SIGKILLs it.
fn terminate(mut child: Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = child.id().to_string();
    let mut kill = Command::new("kill");
    kill.args(["-TERM", &pid]);
    // If `kill` is unavailable or fails, the SIGKILL below still stops the child.
    let _ = run_with_timeout(kill, KILL_CMD_TIMEOUT);
    if matches!(wait_timeout(&mut child, STOP_TIMEOUT), Ok(Some(_))) {
        return;
    }
    let _ = child.kill();
    match wait_timeout(&mut child, KILL_TIMEOUT) {
        Ok(Some(_)) => {}
        other => {
            panic!("etcd (pid {pid}) did not exit within {KILL_TIMEOUT:?} of SIGKILL: {other:?}")
        }
    }
}

/// Waits for `child` to exit, at most `timeout`; `Ok(None)` if it is still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) and kills it if it takes longer
/// than `timeout`.
pub(crate) fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = match wait_timeout(&mut child, timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = wait_timeout(&mut child, KILL_TIMEOUT);
            return Err(format!(
                "`{program}` did not finish within {timeout:?}; killed it"
            ));
        }
        Err(e) => {
            let _ = child.kill();
            let _ = wait_timeout(&mut child, KILL_TIMEOUT);
            return Err(format!("cannot wait for `{program}`: {e}"));
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// A minimal HTTP/1.0 request to `addr`; returns the response body of a `200` answer.
fn http_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    // HTTP/1.0: the server closes the connection after the response. The read timeout bounds
    // each read; the cap bounds the total.
    let _ = (&mut stream).take(1 << 20).read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    if status_line.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    Some(body.to_owned())
}

/// The last [`LOG_TAIL_BYTES`] of the log written after `offset`.
fn read_log_tail(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("<no log at {}>", path.display());
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = offset.max(len.saturating_sub(LOG_TAIL_BYTES));
    if file.seek(SeekFrom::Start(start)).is_err() {
        return format!("<cannot seek in {}>", path.display());
    }
    let mut buf = Vec::new();
    let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
