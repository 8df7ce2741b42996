//! The raw netlink exchange under [`Netlink`](super::Netlink): one socket,
//! requests acknowledged one by one or in batches, and dumps that are known
//! to be complete.
//!
//! We talk to `netlink-proto` directly instead of through `rtnetlink`'s
//! request builders for three reasons:
//! - rtnetlink swallows ACKs, so a request whose reply never came (the
//!   connection died, or the reply was dropped by a receive-buffer overrun)
//!   looks exactly like a success. Here ACKs are forwarded and required.
//! - rtnetlink's `Handle` sends one message per request; a batch of many
//!   messages in one datagram (what `ip -batch` gets from the kernel's
//!   per-datagram loop) needs `ConnectionHandle::request_batch`.
//! - dumps end on NLMSG_DONE, which is forwarded too, so a dump cut short by
//!   a dying connection is an error rather than a short list.

use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::proto::{Connection, ConnectionHandle};
use rtnetlink::sys::{AsyncSocket, SocketAddr, protocols::NETLINK_ROUTE};

use super::NetlinkError;

/// A route-netlink message as it goes on the wire.
pub(super) type Message = NetlinkMessage<RouteNetlinkMessage>;

/// Messages that are not replies (multicast notifications, overrun markers).
pub(super) type Unsolicited = UnboundedReceiver<(Message, SocketAddr)>;

/// How long one request, batch or dump may take before we give up on it.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Receive buffer asked for (the kernel caps it at `net.core.rmem_max`).
/// Replies to a batch pile up until the connection task reads them.
const RECEIVE_BUFFER: usize = 4 << 20;

/// At most this many messages go in one datagram (like `ip -batch`'s
/// streaming, without one syscall per message).
const MAX_BATCH: usize = 64;

/// Receive-buffer space one (capped) ACK takes, skb overhead included,
/// rounded up generously: the kernel accounts ~770 bytes for a 36-byte ACK.
const REPLY_TRUESIZE: usize = 1024;

/// How often a dump interrupted by concurrent changes (NLM_F_DUMP_INTR) is retried.
const DUMP_ATTEMPTS: usize = 5;

/// NLMSGERR_ATTR_MSG: the extended ACK's human-readable message.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// The kernel's answer to one acknowledged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    /// Done.
    Ack,
    /// Refused with this (positive) errno and maybe an extended-ACK message.
    Nack { errno: i32, detail: Option<String> },
}

impl Reply {
    /// `Ok` for an ACK (or a NACK whose errno `ok_errnos` accepts), else the kernel's error.
    pub(super) fn into_result(self, op: &str, ok_errnos: &[i32]) -> Result<(), NetlinkError> {
        match self {
            Reply::Ack => Ok(()),
            Reply::Nack { errno, .. } if ok_errnos.contains(&errno) => Ok(()),
            Reply::Nack { errno, detail } => Err(NetlinkError::Kernel {
                op: op.to_owned(),
                errno,
                detail,
            }),
        }
    }
}

/// Why a batch as a whole has no per-message answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BatchFailure {
    /// The connection is gone.
    Closed,
    /// Not every message was answered in time.
    Timeout,
    /// The replies could not be matched to the messages.
    Garbled,
}

impl BatchFailure {
    pub(super) fn into_error(self, op: &str) -> NetlinkError {
        let op = op.to_owned();
        match self {
            Self::Closed => NetlinkError::ConnectionClosed { op },
            Self::Timeout => NetlinkError::Timeout {
                op,
                timeout: REQUEST_TIMEOUT,
            },
            Self::Garbled => NetlinkError::Protocol {
                op,
                detail: "the kernel's replies could not be matched to the requests".into(),
            },
        }
    }
}

/// One route-netlink socket with its connection task's handle.
#[derive(Debug, Clone)]
pub(super) struct Conn {
    handle: ConnectionHandle<RouteNetlinkMessage>,
    /// Messages per batch datagram whose replies surely fit the receive buffer.
    batch_size: usize,
}

/// Opens a route-netlink socket in the calling thread's network namespace,
/// subscribed to the multicast `groups` bitmask (0: none).
pub(super) fn open(
    groups: u32,
) -> Result<(Connection<RouteNetlinkMessage>, Conn, Unsolicited), NetlinkError> {
    let (mut connection, handle, unsolicited) =
        rtnetlink::proto::new_connection::<RouteNetlinkMessage>(NETLINK_ROUTE)
            .map_err(NetlinkError::Socket)?;
    // Without these, an ACK (or the end of a dump) is dropped by the
    // connection and a reply that never arrives is indistinguishable from one
    // that said "done".
    connection.set_forward_ack(true);
    connection.set_forward_done(true);
    let socket = connection.socket_mut().socket_mut();
    socket
        .bind(&SocketAddr::new(0, groups))
        .map_err(NetlinkError::Socket)?;
    socket
        .set_rx_buf_sz(RECEIVE_BUFFER)
        .map_err(NetlinkError::Socket)?;
    // Extended ACKs carry the kernel's reason ("Nexthop has invalid
    // gateway"); capped ACKs don't echo the whole request back, which keeps
    // error replies small in the receive buffer.
    socket.set_ext_ack(true).map_err(NetlinkError::Socket)?;
    socket.set_cap_ack(true).map_err(NetlinkError::Socket)?;
    // The connection task reads the socket dry before each datagram it
    // sends, so at most one batch's replies wait in the buffer: size batches
    // to what we actually got (`net.core.rmem_max` may have capped it), with
    // room to spare for other replies.
    let buffer = socket.get_rx_buf_sz().map_err(NetlinkError::Socket)?;
    let batch_size = (buffer / 2 / REPLY_TRUESIZE).clamp(1, MAX_BATCH);
    Ok((connection, Conn { handle, batch_size }, unsolicited))
}

impl Conn {
    /// How many messages [`Conn::batch`] should be given at most.
    pub(super) fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Sends `requests` in one datagram, each with NLM_F_REQUEST|NLM_F_ACK
    /// added to `flags`, and returns the kernel's answer to each, in order.
    ///
    /// The kernel processes the messages of a datagram one after the other
    /// and answers each; replies are matched by sequence number (the
    /// connection numbers a batch's messages consecutively).
    pub(super) fn batch(
        &self,
        requests: Vec<(RouteNetlinkMessage, u16)>,
    ) -> impl Future<Output = Result<Vec<Reply>, BatchFailure>> + use<> {
        let count = requests.len();
        let messages: Vec<Message> = requests
            .into_iter()
            .map(|(inner, flags)| {
                let mut message = NetlinkMessage::from(inner);
                message.header.flags = flags | NLM_F_REQUEST | NLM_F_ACK;
                message
            })
            .collect();
        // Queued to the connection task here, synchronously, so batches
        // reach the kernel in the order this is called.
        let sent = (count > 0).then(|| self.handle.request_batch(messages, SocketAddr::new(0, 0)));
        async move {
            let Some(sent) = sent else {
                return Ok(Vec::new());
            };
            let mut replies = sent.map_err(|_| BatchFailure::Closed)?;
            let mut answers: Vec<(u32, Reply)> = Vec::with_capacity(count);
            let collect = async {
                while let Some(message) = replies.next().await {
                    let seq = message.header.sequence_number;
                    let flags = message.header.flags;
                    if let NetlinkPayload::Error(error) = message.payload {
                        answers.push((
                            seq,
                            reply_of(error.code.map(|c| c.get()), flags, &error.header),
                        ));
                    }
                }
            };
            // The stream only ends once every message is answered, so running
            // out of time means at least one reply is missing.
            let timed_out = tokio::time::timeout(REQUEST_TIMEOUT, collect)
                .await
                .is_err();
            if timed_out {
                return Err(BatchFailure::Timeout);
            }
            if answers.len() < count {
                // The stream ended early: the connection task is gone.
                return Err(BatchFailure::Closed);
            }
            let first = answers.iter().map(|(seq, _)| *seq).min().unwrap_or(0);
            let mut ordered: Vec<Option<Reply>> = vec![None; count];
            for (seq, reply) in answers {
                let slot = usize::try_from(seq.wrapping_sub(first))
                    .ok()
                    .and_then(|i| ordered.get_mut(i));
                match slot {
                    Some(slot @ None) => *slot = Some(reply),
                    _ => return Err(BatchFailure::Garbled),
                }
            }
            ordered
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or(BatchFailure::Garbled)
        }
    }

    /// Sends one acknowledged request.
    pub(super) async fn ack(
        &self,
        request: RouteNetlinkMessage,
        flags: u16,
        op: &str,
    ) -> Result<Reply, NetlinkError> {
        let mut replies = self
            .batch(vec![(request, flags)])
            .await
            .map_err(|failure| failure.into_error(op))?;
        replies
            .pop()
            .ok_or_else(|| BatchFailure::Garbled.into_error(op))
    }

    /// Sends a request that is answered with one message (e.g. RTM_GETLINK for
    /// one link), or a NACK.
    pub(super) async fn get(
        &self,
        request: RouteNetlinkMessage,
        op: &str,
    ) -> Result<Result<RouteNetlinkMessage, Reply>, NetlinkError> {
        let mut message = NetlinkMessage::from(request);
        message.header.flags = NLM_F_REQUEST;
        let mut replies = self
            .handle
            .request(message, SocketAddr::new(0, 0))
            .map_err(|_| NetlinkError::ConnectionClosed { op: op.to_owned() })?;
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, replies.next())
            .await
            .map_err(|_| BatchFailure::Timeout.into_error(op))?
            .ok_or_else(|| NetlinkError::ConnectionClosed { op: op.to_owned() })?;
        let flags = reply.header.flags;
        match reply.payload {
            NetlinkPayload::InnerMessage(inner) => Ok(Ok(inner)),
            NetlinkPayload::Error(error) => Ok(Err(reply_of(
                error.code.map(|c| c.get()),
                flags,
                &error.header,
            ))),
            other => Err(NetlinkError::Protocol {
                op: op.to_owned(),
                detail: format!("unexpected reply {other:?}"),
            }),
        }
    }

    /// Dumps everything `request` asks for. Retried when the kernel flags the
    /// dump as interrupted (the table changed under it), so the result is a
    /// consistent snapshot.
    pub(super) async fn dump(
        &self,
        request: RouteNetlinkMessage,
        op: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.dump_map(request, op, Some).await
    }

    /// Like [`Self::dump`], but turns each message into a `T` (or drops it)
    /// as it arrives, so a dump of thousands of entries never holds the
    /// parsed messages all at once.
    pub(super) async fn dump_map<T>(
        &self,
        request: RouteNetlinkMessage,
        op: &str,
        mut keep: impl FnMut(RouteNetlinkMessage) -> Option<T>,
    ) -> Result<Vec<T>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            let attempt = self.dump_once(request.clone(), op, &mut keep);
            match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
                Err(_) => return Err(BatchFailure::Timeout.into_error(op)),
                Ok(Err(error)) => return Err(error),
                Ok(Ok(Some(messages))) => return Ok(messages),
                Ok(Ok(None)) => {
                    tracing::debug!(op, "dump interrupted by a concurrent change, retrying")
                }
            }
        }
        Err(NetlinkError::Protocol {
            op: op.to_owned(),
            detail: format!("the dump was interrupted by concurrent changes {DUMP_ATTEMPTS} times"),
        })
    }

    /// One dump attempt; `None` if it was interrupted.
    async fn dump_once<T>(
        &self,
        request: RouteNetlinkMessage,
        op: &str,
        keep: &mut impl FnMut(RouteNetlinkMessage) -> Option<T>,
    ) -> Result<Option<Vec<T>>, NetlinkError> {
        let mut message = NetlinkMessage::from(request);
        message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut replies = self
            .handle
            .request(message, SocketAddr::new(0, 0))
            .map_err(|_| NetlinkError::ConnectionClosed { op: op.to_owned() })?;
        let mut out = Vec::new();
        let mut interrupted = false;
        while let Some(reply) = replies.next().await {
            let flags = reply.header.flags;
            interrupted |= flags & NLM_F_DUMP_INTR != 0;
            match reply.payload {
                NetlinkPayload::InnerMessage(inner) => out.extend(keep(inner)),
                NetlinkPayload::Done(_) => return Ok((!interrupted).then_some(out)),
                NetlinkPayload::Error(error) => {
                    return Err(reply_of(error.code.map(|c| c.get()), flags, &error.header)
                        .into_result(op, &[])
                        .err()
                        .unwrap_or_else(|| NetlinkError::Protocol {
                            op: op.to_owned(),
                            detail: "the dump was acknowledged instead of answered".into(),
                        }));
                }
                NetlinkPayload::Overrun(_) => {
                    return Err(NetlinkError::Protocol {
                        op: op.to_owned(),
                        detail: "netlink receive buffer overrun".into(),
                    });
                }
                _ => {}
            }
        }
        Err(NetlinkError::ConnectionClosed { op: op.to_owned() })
    }
}

/// Turns an NLMSG_ERROR into a [`Reply`], picking the extended-ACK message
/// out of its payload.
fn reply_of(code: Option<i32>, flags: u16, payload: &[u8]) -> Reply {
    match code {
        None | Some(0) => Reply::Ack,
        Some(code) => Reply::Nack {
            errno: code.saturating_abs(),
            detail: extended_ack_message(flags, payload),
        },
    }
}

/// The NLMSGERR_ATTR_MSG string of an extended ACK. `payload` is what follows
/// the error code: the request's header (or the whole request unless the
/// ACK is capped), then the TLVs if NLM_F_ACK_TLVS is set.
fn extended_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let request_len = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        let len = payload.get(..4)?;
        usize::try_from(u32::from_ne_bytes(len.try_into().ok()?)).ok()?
    };
    let mut tlvs = payload.get(align4(request_len)..)?;
    while tlvs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([tlvs[0], tlvs[1]]));
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &tlvs[4..len];
            let text = text.split(|b| *b == 0).next().unwrap_or(text);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        tlvs = tlvs.get(align4(len)..).unwrap_or(&[]);
    }
    None
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_ack_message_is_found_after_a_capped_header() {
        let mut payload = vec![0u8; 16];
        let text = b"Nexthop has invalid gateway\0";
        let len = u16::try_from(4 + text.len()).unwrap();
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        assert_eq!(
            extended_ack_message(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        assert_eq!(extended_ack_message(NLM_F_CAPPED, &payload), None);
        assert_eq!(
            extended_ack_message(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload[..18]),
            None
        );
    }

    #[test]
    fn replies_map_errno_and_accepted_errnos() {
        let nack = reply_of(Some(-2), 0, &[]);
        assert_eq!(
            nack,
            Reply::Nack {
                errno: 2,
                detail: None
            }
        );
        assert!(nack.clone().into_result("ip neigh del", &[2]).is_ok());
        let err = nack
            .into_result("ip neigh del 10.244.2.0 dev flannel.1", &[])
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ip neigh del 10.244.2.0 dev flannel.1: No such file"),
            "{err}"
        );
        assert_eq!(reply_of(None, 0, &[]), Reply::Ack);
    }
}
