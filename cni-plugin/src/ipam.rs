//! Address allocation from the node subnet, kept under `dataDir`.
//!
//! Layout (everything under `<dataDir>/ipam/`):
//! - `lock`: every reservation, release and GC holds an exclusive `flock` on it;
//! - `<subnet>/<ip>` (subnet as in lease keys, `10.244.1.0-24`): the
//!   reservation of one address; its content is the owner,
//!   `<network>\n<containerID>\n<ifname>\n`;
//! - `<subnet>/last_reserved_ip`: where the round-robin search resumes, so a
//!   just-released address is not handed out again at once;
//! - `attachments/<network>:<containerID>:<ifname>`: the index from an
//!   attachment to its address, `<ip>\n<subnet>\n`. (`:` cannot occur in any
//!   of the three names, so the file name is unambiguous.)
//!
//! Crash safety (a SIGKILL at any instant): a reservation file appears
//! atomically with its full content (written to a temporary file, then
//! hard-linked into place, which fails if the address is taken), and only
//! after the attachment's index points at it. So every reservation is
//! reachable from its attachment's index, DEL of that attachment releases
//! it, and GC releases it if the runtime no longer knows the attachment. An
//! index whose reservation is missing or owned by someone else is ignored.
//! No two reservation files can name the same address, so no address is
//! ever given out twice.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

use crate::config::{Attachment, first_host};
use crate::error::{CniError, CniResult, ErrorCode};

/// Who holds an address: one interface of one container on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The network name.
    pub network: String,
    /// The container ID.
    pub container_id: String,
    /// The interface name in the container.
    pub ifname: String,
}

impl Owner {
    fn encode(&self) -> String {
        format!("{}\n{}\n{}\n", self.network, self.container_id, self.ifname)
    }

    fn decode(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let owner = Self {
            network: lines.next()?.to_owned(),
            container_id: lines.next()?.to_owned(),
            ifname: lines.next()?.to_owned(),
        };
        lines.next().is_none().then_some(owner)
    }

    fn index_name(&self) -> String {
        format!("{}:{}:{}", self.network, self.container_id, self.ifname)
    }
}

/// The IPAM state, locked for the lifetime of this value.
#[derive(Debug)]
pub struct Ipam {
    root: PathBuf,
    /// Held for its `flock`; released when dropped (or when the process dies).
    _lock: File,
}

fn io_error(what: &str, path: &Path, e: io::Error) -> CniError {
    CniError::new(
        ErrorCode::Io,
        format!("IPAM state: cannot {what} {}", path.display()),
    )
    .with_details(e)
}

/// `10.244.1.0/24` -> `10.244.1.0-24`, as in flannel's lease keys.
fn subnet_key(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

impl Ipam {
    /// Opens (creating, mode 0700) `<data_dir>/ipam` and takes its lock,
    /// waiting for other plugin processes.
    pub fn lock(data_dir: &Path) -> CniResult<Self> {
        let root = data_dir.join("ipam");
        let lock_path = root.join("lock");
        let open = |create: bool| {
            OpenOptions::new()
                .create(create)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
        };
        // The lock file is created only after the directories, so when it
        // exists they do (also after a SIGKILL halfway through creating
        // them): the common case costs one open.
        let lock = match open(false) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let attachments = root.join("attachments");
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&attachments)
                    .map_err(|e| io_error("create", &attachments, e))?;
                open(true)
            }
            other => other,
        }
        .map_err(|e| io_error("open", &lock_path, e))?;
        lock.lock().map_err(|e| io_error("lock", &lock_path, e))?;
        Ok(Self { root, _lock: lock })
    }

    fn subnet_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn index_path(&self, owner: &Owner) -> PathBuf {
        self.root.join("attachments").join(owner.index_name())
    }

    /// The address `owner` holds, if any (with its subnet key).
    fn lookup(&self, owner: &Owner) -> Option<(Ipv4Addr, String)> {
        let text = fs::read_to_string(self.index_path(owner)).ok()?;
        let mut lines = text.lines();
        let ip: Ipv4Addr = lines.next()?.parse().ok()?;
        let key = lines.next()?.to_owned();
        let holder = fs::read_to_string(self.subnet_dir(&key).join(ip.to_string())).ok()?;
        (Owner::decode(&holder).as_ref() == Some(owner)).then_some((ip, key))
    }

    /// The address `owner` holds in `subnet`, if any.
    pub fn find(&self, subnet: Ipv4Network, owner: &Owner) -> Option<Ipv4Addr> {
        self.lookup(owner)
            .filter(|(_, key)| *key == subnet_key(subnet))
            .map(|(ip, _)| ip)
    }

    /// Reserves an address of `subnet` for `owner`: the one it already holds
    /// (ADD repeated), else `requested` if given (and free), else the next
    /// free one after the last reserved, from `.2` up to the last host.
    /// Also tells whether the address is newly reserved (false: ADD repeated).
    pub fn reserve(
        &self,
        subnet: Ipv4Network,
        owner: &Owner,
        requested: Option<Ipv4Addr>,
    ) -> CniResult<(Ipv4Addr, bool)> {
        if let Some(held) = self.find(subnet, owner) {
            if requested.is_none_or(|r| r == held) {
                return Ok((held, false));
            }
            return Err(CniError::plugin(format!(
                "container {} interface {} already has {held}, not the requested {}",
                owner.container_id,
                owner.ifname,
                requested.map_or_else(String::new, |r| r.to_string())
            )));
        }
        let (first, last) = host_range(subnet)?;
        let key = subnet_key(subnet);
        let dir = self.subnet_dir(&key);
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .or_else(|e| {
                if e.kind() == ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| io_error("create", &dir, e))?;

        if let Some(ip) = requested {
            let n = u32::from(ip);
            if !subnet.contains(ip) || n < first || n > last {
                return Err(CniError::plugin(format!(
                    "requested IP {ip} is not a container address of the node subnet {subnet} \
                     ({} - {})",
                    Ipv4Addr::from(first),
                    Ipv4Addr::from(last)
                )));
            }
            if let Some(holder) = self.holder(&dir, ip) {
                return Err(CniError::plugin(format!(
                    "requested IP {ip} is already allocated to container {} interface {} on \
                     network {}",
                    holder.container_id, holder.ifname, holder.network
                )));
            }
            self.claim(&dir, &key, ip, owner)?;
            return Ok((ip, true));
        }

        let last_path = dir.join("last_reserved_ip");
        let resume = fs::read_to_string(&last_path)
            .ok()
            .and_then(|t| t.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|n| (first..=last).contains(n));
        let size = last - first + 1;
        let start = resume.map_or(first, |n| if n == last { first } else { n + 1 });
        for step in 0..size {
            let n = first + (start - first + step) % size;
            let ip = Ipv4Addr::from(n);
            let path = dir.join(ip.to_string());
            match fs::symlink_metadata(&path) {
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("inspect", &path, e)),
            }
            self.claim(&dir, &key, ip, owner)?;
            // Only a hint for the next search: a lost or torn update just
            // restarts the search at `.2`, so no rename is needed.
            let _ = write_new(&last_path, &format!("{ip}\n"));
            return Ok((ip, true));
        }
        Err(CniError::plugin(format!(
            "no free address left in the node subnet {subnet} (all {size} container addresses \
             are allocated; see {})",
            dir.display()
        )))
    }

    /// Who holds `ip` in `dir`, if anyone (an unreadable file counts as held).
    fn holder(&self, dir: &Path, ip: Ipv4Addr) -> Option<Owner> {
        match fs::read_to_string(dir.join(ip.to_string())) {
            Ok(text) => Some(Owner::decode(&text).unwrap_or(Owner {
                network: "?".into(),
                container_id: "?".into(),
                ifname: "?".into(),
            })),
            Err(_) => None,
        }
    }

    /// Points `owner`'s index at `ip`, then creates the reservation file
    /// atomically (see the module docs for why in this order).
    fn claim(&self, dir: &Path, key: &str, ip: Ipv4Addr, owner: &Owner) -> CniResult<()> {
        let index = self.index_path(owner);
        // Written in place: a torn index never points at a reservation of
        // this owner (that is created below), so it is ignored like any
        // stale index.
        write_new(&index, &format!("{ip}\n{key}\n")).map_err(|e| io_error("write", &index, e))?;
        let path = dir.join(ip.to_string());
        let tmp = dir.join(format!(".{ip}.{}.tmp", std::process::id()));
        match write_new(&tmp, &owner.encode()) {
            // The first reservation in this subnet: make its directory.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                DirBuilder::new()
                    .mode(0o700)
                    .create(dir)
                    .or_else(|e| {
                        if e.kind() == ErrorKind::AlreadyExists {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| io_error("create", dir, e))?;
                write_new(&tmp, &owner.encode())
            }
            other => other,
        }
        .map_err(|e| io_error("write", &tmp, e))?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(CniError::plugin(format!(
                "address {ip} was taken by a process that does not hold the IPAM lock ({})",
                path.display()
            ))),
            Err(e) => Err(io_error("create", &path, e)),
        }
    }

    /// Releases what `owner` holds (nothing held is fine: DEL is idempotent).
    /// Returns the released address.
    pub fn release(&self, owner: &Owner) -> CniResult<Option<Ipv4Addr>> {
        let released = match self.lookup(owner) {
            Some((ip, key)) => {
                let path = self.subnet_dir(&key).join(ip.to_string());
                remove_if_present(&path)?;
                Some(ip)
            }
            None => None,
        };
        remove_if_present(&self.index_path(owner))?;
        Ok(released)
    }

    /// Every reservation of `network`, with its owner.
    pub fn reservations(&self, network: &str) -> CniResult<Vec<(Ipv4Addr, Owner)>> {
        let mut out: Vec<(Ipv4Addr, Owner)> = self
            .owned_files(network)?
            .into_iter()
            .map(|(_, ip, owner)| (ip, owner))
            .collect();
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    /// The reservation files of `network`, with address and owner.
    fn owned_files(&self, network: &str) -> CniResult<Vec<(PathBuf, Ipv4Addr, Owner)>> {
        let mut out = Vec::new();
        for (path, ip) in self.reservation_files()? {
            if let Some(owner) = fs::read_to_string(&path)
                .ok()
                .and_then(|t| Owner::decode(&t))
                && owner.network == network
            {
                out.push((path, ip, owner));
            }
        }
        Ok(out)
    }

    /// GC: releases every reservation of `network` whose attachment is not
    /// in `valid`, and drops stale index and temporary files. Returns the
    /// released addresses.
    pub fn gc(&self, network: &str, valid: &[Attachment]) -> CniResult<Vec<Ipv4Addr>> {
        let is_valid = |o: &Owner| {
            valid
                .iter()
                .any(|a| a.container_id == o.container_id && a.ifname == o.ifname)
        };
        let mut released = Vec::new();
        for (path, ip, owner) in self.owned_files(network)? {
            if !is_valid(&owner) {
                remove_if_present(&path)?;
                remove_if_present(&self.index_path(&owner))?;
                released.push(ip);
            }
        }
        released.sort();
        let attachments = self.root.join("attachments");
        let prefix = format!("{network}:");
        for entry in read_dir(&attachments)? {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let Some((container_id, ifname)) = rest.split_once(':') else {
                continue;
            };
            let owner = Owner {
                network: network.to_owned(),
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
            };
            if !is_valid(&owner) || self.lookup(&owner).is_none() {
                remove_if_present(&entry.path())?;
            }
        }
        Ok(released)
    }

    /// All reservation files (`<subnet>/<ip>`), removing leftover temporary
    /// files of killed processes on the way (we hold the lock, so none is live).
    fn reservation_files(&self) -> CniResult<Vec<(PathBuf, Ipv4Addr)>> {
        let mut out = Vec::new();
        for subnet_dir in read_dir(&self.root)? {
            let dir = subnet_dir.path();
            if !dir.is_dir() || subnet_dir.file_name() == "attachments" {
                continue;
            }
            for entry in read_dir(&dir)? {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') && name.ends_with(".tmp") {
                    remove_if_present(&entry.path())?;
                } else if let Ok(ip) = name.parse::<Ipv4Addr>() {
                    out.push((entry.path(), ip));
                }
            }
        }
        Ok(out)
    }
}

/// The container addresses of `subnet`: `.2` to the last before broadcast.
fn host_range(subnet: Ipv4Network) -> CniResult<(u32, u32)> {
    let gateway = first_host(subnet).ok_or_else(|| {
        CniError::plugin(format!("node subnet {subnet} has no room for containers"))
    })?;
    let first = u32::from(gateway) + 1;
    let last = u32::from(subnet.broadcast()) - 1;
    if first > last {
        return Err(CniError::plugin(format!(
            "node subnet {subnet} has no room for containers"
        )));
    }
    Ok((first, last))
}

fn read_dir(dir: &Path) -> CniResult<Vec<fs::DirEntry>> {
    let entries = fs::read_dir(dir).map_err(|e| io_error("list", dir, e))?;
    entries
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| io_error("list", dir, e))
}

fn remove_if_present(path: &Path) -> CniResult<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path, e)),
    }
}

/// Creates or truncates `path` and writes `text`, mode 0600.
fn write_new(path: &Path, text: &str) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn owner(cid: &str) -> Owner {
        Owner {
            network: "net".into(),
            container_id: cid.into(),
            ifname: "eth0".into(),
        }
    }

    impl Ipam {
        /// [`Ipam::reserve`], the address only.
        fn reserve_ip(
            &self,
            subnet: Ipv4Network,
            owner: &Owner,
            requested: Option<Ipv4Addr>,
        ) -> CniResult<Ipv4Addr> {
            self.reserve(subnet, owner, requested).map(|(ip, _)| ip)
        }
    }

    fn subnet(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_from_dot_two_never_gateway_network_or_broadcast() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::lock(dir.path()).unwrap();
        let s = subnet("10.244.3.0/29");
        let got: Vec<Ipv4Addr> = (0..5)
            .map(|i| ipam.reserve_ip(s, &owner(&format!("c{i}")), None).unwrap())
            .collect();
        let want: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(10, 244, 3, h)).collect();
        assert_eq!(got, want);
        let e = ipam.reserve_ip(s, &owner("c9"), None).unwrap_err();
        assert!(e.msg.contains("no free address"), "{}", e.msg);
    }

    #[test]
    fn repeated_add_gets_the_same_address_and_release_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::lock(dir.path()).unwrap();
        let s = subnet("10.244.3.0/24");
        let a = ipam.reserve_ip(s, &owner("a"), None).unwrap();
        assert_eq!(ipam.reserve_ip(s, &owner("a"), None).unwrap(), a);
        assert_eq!(ipam.reserve_ip(s, &owner("a"), Some(a)).unwrap(), a);
        assert_eq!(ipam.release(&owner("a")).unwrap(), Some(a));
        assert_eq!(ipam.release(&owner("a")).unwrap(), None);
        assert!(ipam.reservations("net").unwrap().is_empty());
    }

    #[test]
    fn round_robin_does_not_reuse_a_just_released_address() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::lock(dir.path()).unwrap();
        let s = subnet("10.244.3.0/24");
        let a = ipam.reserve_ip(s, &owner("a"), None).unwrap();
        ipam.release(&owner("a")).unwrap();
        let b = ipam.reserve_ip(s, &owner("b"), None).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn requested_addresses_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::lock(dir.path()).unwrap();
        let s = subnet("10.244.3.0/24");
        let want = Ipv4Addr::new(10, 244, 3, 77);
        assert_eq!(ipam.reserve_ip(s, &owner("a"), Some(want)).unwrap(), want);
        let e = ipam.reserve_ip(s, &owner("b"), Some(want)).unwrap_err();
        assert!(
            e.msg.contains("already allocated to container a"),
            "{}",
            e.msg
        );
        for bad in [
            [10, 244, 3, 1],
            [10, 244, 3, 0],
            [10, 244, 3, 255],
            [10, 9, 9, 9],
        ] {
            let e = ipam
                .reserve_ip(s, &owner("c"), Some(Ipv4Addr::from(bad)))
                .unwrap_err();
            assert!(e.msg.contains("not a container address"), "{}", e.msg);
        }
    }

    #[test]
    fn gc_releases_only_unlisted_attachments_of_its_network() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::lock(dir.path()).unwrap();
        let s = subnet("10.244.3.0/24");
        let keep = ipam.reserve_ip(s, &owner("keep"), None).unwrap();
        let gone = ipam.reserve_ip(s, &owner("gone"), None).unwrap();
        let other = Owner {
            network: "other".into(),
            ..owner("x")
        };
        ipam.reserve_ip(s, &other, None).unwrap();
        let valid = [Attachment {
            container_id: "keep".into(),
            ifname: "eth0".into(),
        }];
        assert_eq!(ipam.gc("net", &valid).unwrap(), vec![gone]);
        let left: Vec<_> = ipam.reservations("net").unwrap();
        assert_eq!(left, vec![(keep, owner("keep"))]);
        assert_eq!(ipam.reservations("other").unwrap().len(), 1);
        assert!(!dir.path().join("ipam/attachments/net:gone:eth0").exists());
    }

    #[test]
    fn a_crash_between_index_and_reservation_leaves_nothing_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::lock(dir.path()).unwrap();
        let s = subnet("10.244.3.0/24");
        // What a SIGKILL right after the index write leaves behind.
        fs::write(
            dir.path().join("ipam/attachments/net:a:eth0"),
            "10.244.3.2\n10.244.3.0-24\n",
        )
        .unwrap();
        fs::create_dir_all(dir.path().join("ipam/10.244.3.0-24")).unwrap();
        fs::write(
            dir.path().join("ipam/10.244.3.0-24/.10.244.3.2.99.tmp"),
            "x",
        )
        .unwrap();
        assert_eq!(ipam.find(s, &owner("a")), None);
        let b = ipam.reserve_ip(s, &owner("b"), None).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(
            ipam.find(s, &owner("a")),
            None,
            "a stale index must not claim b's address"
        );
        assert_eq!(ipam.release(&owner("a")).unwrap(), None);
        assert_eq!(
            ipam.find(s, &owner("b")),
            Some(b),
            "releasing a must not free b"
        );
        ipam.gc("net", &[]).unwrap();
        assert!(
            !dir.path()
                .join("ipam/10.244.3.0-24/.10.244.3.2.99.tmp")
                .exists()
        );
    }

    #[test]
    fn a_crash_while_creating_the_directories_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        // What a SIGKILL between `mkdir ipam` and `mkdir ipam/attachments` leaves.
        fs::create_dir(dir.path().join("ipam")).unwrap();
        let ipam = Ipam::lock(dir.path()).unwrap();
        ipam.reserve_ip(subnet("10.244.3.0/24"), &owner("a"), None)
            .unwrap();
        ipam.gc("net", &[]).unwrap();
    }

    #[test]
    fn concurrent_processes_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let s = subnet("10.244.3.0/24");
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let path = dir.path().to_owned();
                std::thread::spawn(move || {
                    // A separate open file description per "process": flock excludes them.
                    let ipam = Ipam::lock(&path).unwrap();
                    ipam.reserve_ip(s, &owner(&format!("c{i}")), None).unwrap()
                })
            })
            .collect();
        let ips: HashSet<Ipv4Addr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ips.len(), 50);
    }

    proptest::proptest! {
        /// Any sequence of reserve/release/GC keeps every address unique and
        /// within the container range, and each owner's lookup consistent.
        #[test]
        fn any_operation_sequence_keeps_addresses_unique(ops in proptest::collection::vec((0u8..3, 0u8..12), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let ipam = Ipam::lock(dir.path()).unwrap();
            let s = subnet("10.244.3.0/28");
            for (op, who) in ops {
                let o = owner(&format!("c{who}"));
                match op {
                    0 => { let _ = ipam.reserve_ip(s, &o, None); }
                    1 => { ipam.release(&o).unwrap(); }
                    _ => {
                        let valid: Vec<Attachment> = (0..6)
                            .map(|i| Attachment { container_id: format!("c{i}"), ifname: "eth0".into() })
                            .collect();
                        ipam.gc("net", &valid).unwrap();
                    }
                }
                let all = ipam.reservations("net").unwrap();
                let ips: HashSet<Ipv4Addr> = all.iter().map(|(ip, _)| *ip).collect();
                proptest::prop_assert_eq!(ips.len(), all.len());
                for (ip, o) in &all {
                    let n = u32::from(*ip);
                    proptest::prop_assert!((u32::from(Ipv4Addr::new(10, 244, 3, 2))..=u32::from(Ipv4Addr::new(10, 244, 3, 14))).contains(&n));
                    proptest::prop_assert_eq!(ipam.find(s, o), Some(*ip));
                }
            }
        }
    }
}
