//! Cluster tests on `ip netns` nodes with a real etcd.
//!
//! The harness (underlay bridge, node and container namespaces, one flanneld
//! per node) arrives with the VXLAN issue. The lease tests on a real etcd
//! live with the `subnet` crate (`subnet/tests/`).
