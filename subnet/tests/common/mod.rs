//! Shared support code for the `subnet` integration tests and benchmarks.
//!
//! Not every test binary uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub(crate) mod etcd_server;
pub(crate) mod harness;
pub(crate) mod nodes;
pub(crate) mod proxy;

/// Runs an async scenario `$name` (generic over the harness) once against the
/// in-memory store and once against a real etcd, as two tests.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod mem {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let harness = $crate::common::harness::MemHarness::new();
                    super::$name(&harness).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let harness = $crate::common::harness::EtcdHarness::new().await;
                    super::$name(&harness).await;
                }
            )*
        }
    };
}
