//! A small synchronous rtnetlink client: the plugin is a short-lived
//! process that sends a handful of requests, so a blocking socket and
//! pipelined, individually acknowledged requests are all it needs.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::sched::{CloneFlags, setns};

use crate::error::{CniError, ErrorCode};

/// EEXIST: the object already exists.
pub const EEXIST: i32 = 17;
/// ENODEV: no such device.
pub const ENODEV: i32 = 19;
/// ENOENT: no such object.
pub const ENOENT: i32 = 2;
/// ESRCH: no such route.
pub const ESRCH: i32 = 3;
/// EADDRNOTAVAIL: no such address.
pub const EADDRNOTAVAIL: i32 = 99;

/// Receive buffer: large enough for any single netlink datagram.
const RECV_BUFFER: usize = 64 * 1024;

/// A netlink request that failed, with what we were doing.
#[derive(Debug, thiserror::Error)]
#[error("netlink: {what}: {source}")]
pub struct NlError {
    /// The operation, in words (`add address 10.244.1.5/24 to eth0`).
    pub what: String,
    /// The kernel's (or the socket's) error.
    pub source: io::Error,
}

impl NlError {
    /// The errno, if the kernel answered with one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    fn new(what: &str, source: io::Error) -> Self {
        Self {
            what: what.to_owned(),
            source,
        }
    }
}

impl From<NlError> for CniError {
    fn from(e: NlError) -> Self {
        CniError::plugin(e.to_string())
    }
}

/// One request of a batch: the message, extra header flags, and a
/// description for errors.
pub type Request = (RouteNetlinkMessage, u16, String);

/// A route-netlink socket bound to the network namespace it was opened in.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a socket in the current network namespace.
    pub fn open() -> Result<Self, NlError> {
        let mut socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| NlError::new("open a netlink socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| NlError::new("bind the netlink socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| NlError::new("connect the netlink socket", e))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Opens a socket inside the network namespace `netns` (an open
    /// `/proc/<pid>/ns/net` or `/run/netns/<name>` file). A netlink socket
    /// stays in the namespace it was created in, so the thread switches
    /// there, opens it and switches back.
    pub fn open_in(netns: &File) -> Result<Self, CniError> {
        let own = File::open("/proc/thread-self/ns/net").map_err(|e| {
            CniError::new(ErrorCode::Io, "cannot open our own network namespace").with_details(e)
        })?;
        setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            CniError::new(
                ErrorCode::Io,
                "cannot enter the container network namespace",
            )
            .with_details(e)
        })?;
        let opened = Self::open();
        // Going back can only fail if our own namespace vanished, which it cannot.
        setns(own.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            CniError::new(ErrorCode::Io, "cannot return to the host network namespace")
                .with_details(e)
        })?;
        Ok(opened?)
    }

    fn encode(&mut self, message: RouteNetlinkMessage, flags: u16, out: &mut Vec<u8>) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let mut m = NetlinkMessage::from(message);
        m.header.flags = NLM_F_REQUEST | flags;
        m.header.sequence_number = self.seq;
        m.finalize();
        let start = out.len();
        out.resize(start + m.buffer_len(), 0);
        m.serialize(&mut out[start..]);
        self.seq
    }

    /// Sends all requests in one datagram and checks every ACK; returns the
    /// first failure (the kernel still executes the later requests).
    pub fn batch(&mut self, requests: Vec<Request>) -> Result<(), NlError> {
        self.batch_allowing(requests, &[])
    }

    /// As [`Netlink::batch`], treating the listed errnos as success.
    pub fn batch_allowing(&mut self, requests: Vec<Request>, ok: &[i32]) -> Result<(), NlError> {
        if requests.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        let mut pending = Vec::with_capacity(requests.len());
        for (message, flags, what) in requests {
            let seq = self.encode(message, flags | NLM_F_ACK, &mut out);
            pending.push((seq, what));
        }
        self.socket
            .send(&out, 0)
            .map_err(|e| NlError::new(&pending[0].1, e))?;
        let mut first_error = None;
        let mut remaining = pending.len();
        while remaining > 0 {
            for m in self.receive(&pending[0].1)? {
                let NetlinkPayload::Error(err) = m.payload else {
                    continue;
                };
                let Some(index) = pending
                    .iter()
                    .position(|(s, _)| *s == m.header.sequence_number)
                else {
                    continue;
                };
                remaining -= 1;
                if let Some(code) = err.code {
                    let errno = -code.get();
                    if !ok.contains(&errno) && first_error.is_none() {
                        first_error = Some(NlError::new(
                            &pending[index].1,
                            io::Error::from_raw_os_error(errno),
                        ));
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One acknowledged request.
    pub fn execute(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        what: impl Into<String>,
    ) -> Result<(), NlError> {
        self.batch(vec![(message, flags, what.into())])
    }

    /// A GET request answered by one object; `Ok(None)` if the kernel says
    /// it does not exist (ENODEV, ENOENT).
    pub fn get(
        &mut self,
        message: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Option<RouteNetlinkMessage>, NlError> {
        let mut out = Vec::new();
        let seq = self.encode(message, 0, &mut out);
        self.socket
            .send(&out, 0)
            .map_err(|e| NlError::new(what, e))?;
        loop {
            for m in self.receive(what)? {
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => return Ok(Some(inner)),
                    NetlinkPayload::Error(err) => {
                        let errno = err.code.map_or(0, |c| -c.get());
                        if errno == ENODEV || errno == ENOENT {
                            return Ok(None);
                        }
                        return Err(NlError::new(what, io::Error::from_raw_os_error(errno)));
                    }
                    _ => {}
                }
            }
        }
    }

    /// A dump request: every object until NLMSG_DONE.
    pub fn dump(
        &mut self,
        message: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        let mut out = Vec::new();
        let seq = self.encode(message, NLM_F_DUMP, &mut out);
        self.socket
            .send(&out, 0)
            .map_err(|e| NlError::new(what, e))?;
        let mut items = Vec::new();
        loop {
            for m in self.receive(what)? {
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => items.push(inner),
                    NetlinkPayload::Done(_) => return Ok(items),
                    NetlinkPayload::Error(err) => {
                        let errno = err.code.map_or(0, |c| -c.get());
                        return Err(NlError::new(what, io::Error::from_raw_os_error(errno)));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Reads one datagram and decodes the messages in it.
    fn receive(&mut self, what: &str) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, NlError> {
        self.buf.clear();
        self.socket
            .recv(&mut self.buf, 0)
            .map_err(|e| NlError::new(what, e))?;
        let mut messages = Vec::new();
        let mut offset = 0;
        while offset < self.buf.len() {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..])
                .map_err(|e| {
                    NlError::new(
                        what,
                        io::Error::new(io::ErrorKind::InvalidData, format!("bad reply: {e}")),
                    )
                })?;
            let len = m.header.length as usize;
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
            messages.push(m);
        }
        Ok(messages)
    }
}
