//! `NBD_CMD_DISC`: no reply; the server finishes every request in flight, then closes.

use tokio::task::JoinSet;

/// Wait for the connection's requests in flight (their replies are still sent).
pub async fn run(inflight: &mut JoinSet<()>) {
    while let Some(r) = inflight.join_next().await {
        if let Err(e) = r {
            tracing::warn!("nbd: request task failed: {e}");
        }
    }
}
