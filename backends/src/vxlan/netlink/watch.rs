//! `ip monitor link`, reduced to "this ifindex was deleted".

use std::collections::BTreeSet;

use futures::StreamExt;
use rtnetlink::constants::RTMGRP_LINK;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use tokio::sync::mpsc;

use super::conn::{self, Conn};
use super::{Netlink, NetlinkError};

/// Deleted ifindexes queued for a slow receiver before the watcher waits.
const QUEUE: usize = 64;

impl Netlink {
    /// Like `ip monitor link`, but only deletions: a receiver of the ifindex
    /// of every link deleted (RTM_DELLINK) from now on. It has its own socket
    /// subscribed to RTNLGRP_LINK, opened in the calling thread's network
    /// namespace before this returns, and its own task on the current
    /// runtime. The stream ends when the [`Netlink`] (all its clones) or the
    /// receiver is dropped, or if the socket fails.
    ///
    /// Notifications lost to a receive-buffer overrun are not lost for us:
    /// on an overrun the watcher re-lists the links and reports every
    /// ifindex that vanished meanwhile.
    pub fn watch_link_removals(&self) -> Result<mpsc::Receiver<u32>, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (connection, conn, events) = conn::open(RTMGRP_LINK)?;
        let connection = runtime.spawn(connection);
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut shutdown = self.inner.shutdown.subscribe();
        runtime.spawn(async move {
            tokio::select! {
                // Only ever closes: nothing is sent on it.
                _ = shutdown.changed() => {}
                () = tx.closed() => {}
                () = forward(&conn, events, &tx) => {}
            }
            connection.abort();
        });
        Ok(rx)
    }
}

/// Forwards deletions from `events` to `tx` until either ends.
async fn forward(conn: &Conn, mut events: conn::Unsolicited, tx: &mpsc::Sender<u32>) {
    // Subscribed before this listing, so no deletion falls between the two.
    let mut known = list_indexes(conn).await.unwrap_or_default();
    while let Some((message, _)) = events.next().await {
        let gone: Vec<u32> = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                known.insert(link.header.index);
                continue;
            }
            // A port leaving a bridge is an AF_BRIDGE RTM_DELLINK; the link lives on.
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
                if link.header.interface_family != AddressFamily::Bridge =>
            {
                known.remove(&link.header.index);
                vec![link.header.index]
            }
            NetlinkPayload::Overrun(_) => {
                tracing::warn!("link notifications were lost (socket overrun); re-listing links");
                match list_indexes(conn).await {
                    Ok(now) => {
                        let gone = known.difference(&now).copied().collect();
                        known = now;
                        gone
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot re-list links after an overrun");
                        continue;
                    }
                }
            }
            _ => continue,
        };
        for index in gone {
            if tx.send(index).await.is_err() {
                return;
            }
        }
    }
    tracing::warn!("the link notification socket closed");
}

async fn list_indexes(conn: &Conn) -> Result<BTreeSet<u32>, NetlinkError> {
    let indexes = conn
        .dump_map(super::dump_links(), "ip link show", |m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
            _ => None,
        })
        .await?;
    Ok(indexes.into_iter().collect())
}
