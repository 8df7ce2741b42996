//! Data-path backends of flanneld.
//!
//! Empty on purpose for now: the VXLAN backend (kernel, through netlink) and the
//! userspace UDP backend are built by later issues. This crate depends on the
//! `subnet` crate's types only, never on etcd, so that a backend can run from any
//! lease source.
