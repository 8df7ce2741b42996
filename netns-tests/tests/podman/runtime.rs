//! A private podman (4.3.1, CNI network backend) confined to one test.
//!
//! Everything podman writes goes under one temporary directory
//! `/tmp/podman-cni-test-<pid>-XXXXXX`: its configuration (`CONTAINERS_CONF`,
//! `CONTAINERS_STORAGE_CONF`, `CONTAINERS_REGISTRIES_CONF`), the storage
//! (`graphroot`, `runroot`), its temporary and runtime directories, the
//! network config directory and the CNI plugin directory. `/etc` is never
//! touched. Two things podman 4.3 keeps elsewhere cannot be moved: the
//! containers' network namespaces (`/run/netns/netns-<uuid>`, removed with
//! the container) and libcni's result cache ([`LIBCNI_RESULTS`], one file per
//! network, container and interface, removed on a successful DEL); the
//! network names are unique per test, and the drop guard deletes what is
//! left of them.
//!
//! Every podman command runs as `nsenter --net=/run/netns/<node> podman ...`
//! with a timeout, so the bridge, the veths and the firewall rules land in
//! the node namespace of the test cluster (and `conmon`, which podman
//! daemonizes, lives there too).
//!
//! The CNI plugins under test are not called directly: a small shell wrapper
//! of the same name in the private plugin directory (searched first) logs
//! each call (command, environment, stdin, exit status and stdout) to
//! [`Podman::call_log_path`] and passes stdin, stdout and the exit status
//! through unchanged. The log shows the exact failing call when a test fails
//! and lets the test check that every ADD was matched by a DEL.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;
use std::thread;
use std::time::Duration;

use netns_tests::{IP_TIMEOUT, describe, log_tail, run};

/// Timeout of one podman command.
pub(crate) const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);
/// libcni's result cache: `<network>-<container id>-<ifname>` files.
pub(crate) const LIBCNI_RESULTS: &str = "/var/lib/cni/results";
/// The busybox-static binary copied into the test image.
pub(crate) const BUSYBOX: &str = "/bin/busybox";
/// The page the image's `/www/index.html` holds (for `httpd`).
pub(crate) const INDEX_PAGE: &str = "podman-cni-test index page";
/// Temporary directories are `/tmp/<this><pid>-XXXXXX`.
const DIR_PREFIX: &str = "podman-cni-test-";
/// The CNI call log in the temporary directory.
const CALL_LOG: &str = "cni-calls.log";
/// Log lines shown when a test fails.
const LOG_LINES: usize = 120;
/// Applets linked into the image's `/bin`.
const APPLETS: &[&str] = &[
    "sh", "ping", "ip", "sleep", "cat", "ls", "httpd", "nc", "wget", "ifconfig", "route",
];

/// A private podman whose commands run in one network namespace. Dropping
/// it (also while a test panics) removes every container (`podman rm -af`,
/// which runs the CNI DELs), resets the storage (`podman system reset`,
/// which unmounts it), kills any process that still runs from its storage
/// (by PID, only ours), unmounts leftovers, deletes the libcni cache entries
/// of its networks and removes its directory. While panicking it first
/// prints the CNI call log and `podman ps -a`.
#[derive(Debug)]
pub(crate) struct Podman {
    /// The namespace every command runs in; `None` runs them in a fresh
    /// anonymous namespace (`unshare --net`), for sweeping the leftovers of a
    /// dead test process whose node namespace is gone.
    netns: Option<String>,
    /// The temporary directory; `None` for a swept directory (removed by the
    /// sweep) or once removed.
    dir: Option<tempfile::TempDir>,
    /// The path of the directory.
    path: PathBuf,
}

impl Podman {
    /// A fresh private podman that runs in node namespace `netns` (a name
    /// under `/run/netns`). First (once per process) cleans up the
    /// directories of test processes that died without their drop guard.
    pub(crate) fn new(netns: &str) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("cannot create the podman test directory");
        let path = dir.path().to_path_buf();
        let podman = Self {
            netns: Some(netns.to_owned()),
            dir: Some(dir),
            path,
        };
        podman.write_config();
        podman
    }

    /// The private directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The directory podman looks for conflists in.
    fn network_dir(&self) -> PathBuf {
        self.path.join("networks")
    }

    /// The private CNI plugin directory (searched before `/usr/lib/cni`).
    fn plugin_dir(&self) -> PathBuf {
        self.path.join("plugins")
    }

    /// Where the plugin wrappers log every CNI call.
    pub(crate) fn call_log_path(&self) -> PathBuf {
        self.path.join(CALL_LOG)
    }

    /// The CNI call log so far (empty if no call was made).
    pub(crate) fn call_log(&self) -> String {
        fs::read_to_string(self.call_log_path()).unwrap_or_default()
    }

    /// Creates the directories and writes `containers.conf`, `storage.conf`
    /// and `registries.conf`.
    fn write_config(&self) {
        for sub in [
            "networks", "plugins", "run", "root", "tmp", "xdg", "config", "data",
        ] {
            let dir = self.path.join(sub);
            fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        // The private runtime directory must not be readable by others.
        fs::set_permissions(self.path.join("xdg"), fs::Permissions::from_mode(0o700))
            .expect("cannot chmod the private XDG_RUNTIME_DIR");
        let q = |p: PathBuf| toml_string(&p);
        let containers = format!(
            "[containers]\n\
             default_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n\
             \n\
             [network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [{plugins}, \"/usr/lib/cni\"]\n\
             network_config_dir = {networks}\n\
             default_network = \"podman-cni-test-default\"\n\
             \n\
             [engine]\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             runtime = \"runc\"\n\
             tmp_dir = {tmp}\n",
            plugins = q(self.plugin_dir()),
            networks = q(self.network_dir()),
            tmp = q(self.path.join("tmp")),
        );
        let storage = format!(
            "[storage]\n\
             driver = \"overlay\"\n\
             runroot = {run}\n\
             graphroot = {root}\n",
            run = q(self.path.join("run")),
            root = q(self.path.join("root")),
        );
        // No registry at all: nothing is ever pulled.
        let registries = "unqualified-search-registries = []\n";
        write(&self.path.join("containers.conf"), &containers);
        write(&self.path.join("storage.conf"), &storage);
        write(&self.path.join("registries.conf"), registries);
    }

    /// Installs CNI plugin `name` for podman: a wrapper script in the
    /// private plugin directory that logs the call and runs `real`.
    pub(crate) fn install_plugin(&self, name: &str, real: &Path) {
        assert!(
            real.is_file(),
            "CNI plugin binary {} not found (build it: cargo build -p cni-plugin)",
            real.display()
        );
        let real = fs::canonicalize(real)
            .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", real.display()));
        let script = format!(
            "#!/bin/sh\n\
             # Logs one CNI call of podman's and runs the real plugin with the\n\
             # same stdin, passing its stdout and exit status back unchanged.\n\
             input=$(cat)\n\
             output=$(printf '%s' \"$input\" | {real})\n\
             status=$?\n\
             {{\n\
             printf '=== %s exit=%s id=%s ifname=%s netns=%s args=%s path=%s\\n' \
             \"$CNI_COMMAND\" \"$status\" \"$CNI_CONTAINERID\" \"$CNI_IFNAME\" \"$CNI_NETNS\" \
             \"$CNI_ARGS\" \"$CNI_PATH\"\n\
             printf 'stdin: %s\\n' \"$input\"\n\
             printf 'stdout: %s\\n' \"$output\"\n\
             }} >> {log}\n\
             printf '%s\\n' \"$output\"\n\
             exit $status\n",
            real = shell_quote(&real),
            log = shell_quote(&self.call_log_path()),
        );
        let wrapper = self.plugin_dir().join(name);
        write(&wrapper, &script);
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", wrapper.display()));
    }

    /// Writes `<name>.conflist` into the network config directory.
    pub(crate) fn write_conflist(&self, name: &str, conflist: &serde_json::Value) {
        let text = serde_json::to_string_pretty(conflist).expect("a JSON value serializes");
        write(&self.network_dir().join(format!("{name}.conflist")), &text);
    }

    /// The podman command line for `args`, in the namespace, with the
    /// private configuration.
    pub(crate) fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"));
                c
            }
            None => {
                let mut c = Command::new("unshare");
                c.arg("--net");
                c
            }
        };
        cmd.args(["--", "podman"]).args(args);
        for (key, sub) in [
            ("CONTAINERS_CONF", "containers.conf"),
            ("CONTAINERS_STORAGE_CONF", "storage.conf"),
            ("CONTAINERS_REGISTRIES_CONF", "registries.conf"),
            ("XDG_RUNTIME_DIR", "xdg"),
            ("XDG_CONFIG_HOME", "config"),
            ("XDG_DATA_HOME", "data"),
            ("TMPDIR", "tmp"),
        ] {
            cmd.env(key, self.path.join(sub));
        }
        cmd.env_remove("CONTAINER_HOST")
            .env_remove("CONTAINER_CONNECTION")
            .env_remove("CONTAINERS_CONF_OVERRIDE");
        cmd
    }

    /// Runs podman with `args` ([`PODMAN_TIMEOUT`]); the exit status is not
    /// checked. Panics if podman cannot be run or times out.
    pub(crate) fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(args);
        match run(&mut cmd, PODMAN_TIMEOUT) {
            Ok(out) => out,
            Err(e) => panic!("{e}\n{}", self.call_log_tail()),
        }
    }

    /// Runs podman with `args` and returns its trimmed stdout; panics with
    /// podman's output and the CNI call log if it fails.
    pub(crate) fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(args);
        let desc = describe(&cmd);
        let out = match run(&mut cmd, PODMAN_TIMEOUT) {
            Ok(out) => out,
            Err(e) => panic!("{e}\n{}", self.call_log_tail()),
        };
        assert!(
            out.status.success(),
            "`{desc}` failed ({}):\nstdout: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.call_log_tail()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The tail of the CNI call log, with a header, for failure messages.
    pub(crate) fn call_log_tail(&self) -> String {
        format!(
            "----- CNI calls ({}), last {LOG_LINES} lines:\n{}",
            self.call_log_path().display(),
            log_tail(&self.call_log_path(), LOG_LINES)
        )
    }

    /// Builds a busybox-static image (`/bin/busybox`, the [`APPLETS`] as
    /// symlinks, `/www/index.html` holding [`INDEX_PAGE`]) without any
    /// registry (`tar`, then `podman import`) and returns its name.
    pub(crate) fn import_busybox(&self) -> String {
        let rootfs = self.path.join("rootfs");
        for sub in ["bin", "www", "tmp", "etc"] {
            let dir = rootfs.join(sub);
            fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
            .unwrap_or_else(|e| panic!("cannot copy {BUSYBOX} (install busybox-static): {e}"));
        for applet in APPLETS {
            symlink("busybox", rootfs.join("bin").join(applet))
                .unwrap_or_else(|e| panic!("cannot link applet {applet}: {e}"));
        }
        write(&rootfs.join("www/index.html"), &format!("{INDEX_PAGE}\n"));
        write(&rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n");
        write(&rootfs.join("etc/group"), "root:x:0:\n");
        let tarball = self.path.join("rootfs.tar");
        let out = run(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tarball)
                .arg("."),
            PODMAN_TIMEOUT,
        )
        .expect("tar of the busybox rootfs");
        assert!(
            out.status.success(),
            "tar failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let image = "localhost/podman-cni-test-busybox:latest".to_owned();
        let tarball = tarball.to_string_lossy().into_owned();
        self.ok(["import", tarball.as_str(), image.as_str()]);
        image
    }

    /// `podman rm -af`, `podman system reset`, then whatever they left.
    /// Returns the problems met (printed by the caller).
    fn cleanup(&self) -> Vec<String> {
        let mut problems = Vec::new();
        // The networks' names, before the reset deletes the conflists.
        let networks = self.network_names();
        for args in [
            &["rm", "--all", "--force", "--time", "0"][..],
            &["system", "reset", "--force"][..],
        ] {
            let mut cmd = self.command(args);
            match run(&mut cmd, PODMAN_TIMEOUT) {
                Ok(out) if out.status.success() => {}
                Ok(out) => problems.push(format!(
                    "`{}` failed ({}): {}",
                    describe(&cmd),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => problems.push(e.to_string()),
            }
        }
        let leftovers = self.our_processes();
        if !leftovers.is_empty() {
            problems.push(format!(
                "processes of ours still ran after podman rm -af, killed: {leftovers:?}"
            ));
            for pid in &leftovers {
                // It may have exited meanwhile.
                let _ = run(
                    Command::new("kill").args(["-s", "KILL", &pid.to_string()]),
                    IP_TIMEOUT,
                );
            }
        }
        for mount in self.our_mounts() {
            problems.push(format!("{mount} was still mounted; unmounting it"));
            let unmounted = run(Command::new("umount").arg(&mount), IP_TIMEOUT)
                .is_ok_and(|o| o.status.success());
            if !unmounted {
                let _ = run(Command::new("umount").arg("-l").arg(&mount), IP_TIMEOUT);
            }
        }
        for name in networks {
            for file in libcni_cache_entries(&name) {
                // Only a failed DEL leaves one; the test reports that itself.
                if let Err(e) = fs::remove_file(&file) {
                    problems.push(format!("cannot remove {}: {e}", file.display()));
                }
            }
        }
        problems
    }

    /// The `name` of every conflist in the network config directory.
    fn network_names(&self) -> BTreeSet<String> {
        let Ok(entries) = fs::read_dir(self.network_dir()) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "conflist"))
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .filter_map(|v| v.get("name")?.as_str().map(str::to_owned))
            .collect()
    }

    /// PIDs of processes that belong to this podman: `conmon` and friends
    /// name the private directory on their command line, and container
    /// processes have their root inside its storage.
    fn our_processes(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let me = std::process::id();
        let needle = self.path.to_string_lossy().into_owned();
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let root = fs::read_link(format!("/proc/{pid}/root")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(&needle) || root.starts_with(&self.path)
            })
            .collect()
    }

    /// Mount points inside the private directory, deepest first.
    fn our_mounts(&self) -> Vec<String> {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.path.to_string_lossy().into_owned();
        let mut mounts: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mountinfo)
            .filter(|m| Path::new(m).starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts.dedup();
        mounts
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if thread::panicking() {
            let ps = self
                .netns
                .is_some()
                .then(|| self.command(["ps", "-a", "--no-trunc"]))
                .and_then(|mut cmd| run(&mut cmd, PODMAN_TIMEOUT).ok())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            eprintln!(
                "######## podman ({}) ########\n----- podman ps -a:\n{ps}{}",
                self.path.display(),
                self.call_log_tail()
            );
        }
        for problem in self.cleanup() {
            eprintln!("podman test cleanup ({}): {problem}", self.path.display());
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            eprintln!(
                "podman test cleanup: cannot remove {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The libcni cache entries of network `name` (`<name>-<id>-<ifname>`).
pub(crate) fn libcni_cache_entries(name: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(LIBCNI_RESULTS) else {
        return Vec::new();
    };
    let prefix = format!("{name}-");
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Cleans up the directories of test processes that are gone (killed
/// before their drop guard ran): their containers, mounts, cache entries
/// and the directory itself. Directories of live processes are left alone.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() || !entry.path().is_dir() {
            continue;
        }
        let stale = Podman {
            netns: None,
            dir: None,
            path: entry.path(),
        };
        eprintln!(
            "podman test: sweeping {} (pid {pid} is gone)",
            stale.path.display()
        );
        for problem in stale.cleanup() {
            eprintln!("podman test sweep ({}): {problem}", stale.path.display());
        }
        if stale.our_mounts().is_empty() {
            // Best effort: another process may be sweeping it too.
            let _ = fs::remove_dir_all(&stale.path);
        }
    }
}

/// Writes `text` to `path`, panicking with the path on failure.
fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// `path` as a TOML basic string (a JSON string is one, for these paths).
fn toml_string(path: &Path) -> String {
    serde_json::to_string(&path.to_string_lossy()).expect("a string serializes")
}

/// `path` single-quoted for `sh`.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
