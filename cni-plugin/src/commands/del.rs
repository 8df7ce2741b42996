//! DEL: idempotent; works without subnet.env, without the netns (already
//! gone) and without prevResult (containerd's second DEL, or a DEL after a
//! failed ADD).

use serde_json::Value;

use super::{open_netns, owner};
use crate::args::Env;
use crate::config::PluginConfig;
use crate::delegate;
use crate::error::CniResult;
use crate::ipam::Ipam;
use crate::links;
use crate::netlink::Netlink;

pub(super) fn del(env: &Env, conf: &PluginConfig) -> CniResult<()> {
    let container_id = env.require_container_id()?;
    let ifname = env.require_ifname()?;
    // A delegated attachment (ours, or one made by flannel itself before an
    // upgrade): replay the saved config to the delegate.
    if let Some(saved) = delegate::load(&conf.data_dir, container_id)? {
        // Unparsable (flannel: "interface may leak until reboot"): nothing to replay.
        if serde_json::from_slice::<Value>(&saved).is_ok() {
            delegate::invoke(env, "DEL", &saved)?;
        }
        std::fs::remove_file(delegate::saved_path(&conf.data_dir, container_id)).ok();
        return Ok(());
    }
    if let Some(path) = &env.netns
        && let Some(netns) = open_netns(path)?
    {
        let mut container = Netlink::open_in(&netns)?;
        // Deleting the container end removes the host end with it.
        links::delete_link(&mut container, ifname)?;
    }
    let owner = owner(env, conf)?;
    Ipam::lock(&conf.data_dir)?.release(&owner)?;
    Ok(())
}
