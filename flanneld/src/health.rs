//! flannel's health endpoints: `GET /healthz` (alive) and `GET /readyz`
//! (ready once the subnet file is written and the rules are installed), and
//! ours: `GET /metrics` (the udp backend's packet and drop counters, in the
//! Prometheus text format).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use backends::udp::engine::Counters;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Shared readiness flag.
#[derive(Debug, Clone, Default)]
pub(crate) struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the daemon ready or not.
    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// Whether the daemon is ready.
    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The counters `/metrics` shows, once a backend that has them exists.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics(Arc<OnceLock<Arc<Counters>>>);

impl Metrics {
    /// Publishes the udp backend's counters (once).
    pub(crate) fn set_udp(&self, counters: Arc<Counters>) {
        let _ = self.0.set(counters);
    }
}

/// What the endpoints share.
#[derive(Debug, Clone)]
struct AppState {
    ready: Readiness,
    metrics: Metrics,
}

async fn metrics(State(state): State<AppState>) -> String {
    state
        .metrics
        .0
        .get()
        .map(|c| c.render_prometheus())
        .unwrap_or_default()
}

async fn healthz() -> &'static str {
    "flanneld is running"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.ready.get() {
        (StatusCode::OK, "flanneld is ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "flanneld is not ready yet")
    }
}

/// Binds `addr` and serves the health endpoints in a background task.
pub(crate) async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    metrics: Metrics,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .with_state(AppState { ready, metrics });
    info!(%addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "the health server stopped");
        }
    });
    Ok(())
}
