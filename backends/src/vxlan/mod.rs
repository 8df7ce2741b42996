//! The VXLAN backend: kernel VXLAN device `flannel.<VNI>`, programmed per peer
//! through netlink exactly as flannel does.
//!
//! - [`options`]: the `Backend` keys;
//! - [`plan`]: pure — which neighbours, FDB entries and routes the peers need;
//! - [`netlink`]: the thin layer that creates the device and applies plans;
//! - [`backend`]: [`backend::VxlanBackend`], the two put together.

pub mod backend;
pub mod netlink;
pub mod options;
pub mod plan;
