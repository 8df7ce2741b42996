//! Shared support code for the `subnet` integration tests and benchmarks.
//!
//! Not every test binary uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub(crate) mod etcd_server;
