//! The accept loop: one task per client connection, bounded by max_client_connections.

use std::sync::Arc;

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::proxy::Proxy;
use crate::session;
use crate::wire::{self, ErrorFields};

/// Binds `listen` and serves clients until the future is dropped.
pub async fn serve(proxy: Arc<Proxy>) -> anyhow::Result<()> {
    let listen = proxy.config().listen.clone();
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        address = %listener.local_addr()?,
        threads = proxy.config().serve_threads(),
        "rolegate is listening"
    );
    accept_loop(proxy, listener).await
}

/// Sets its flag to false when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

pub async fn accept_loop(proxy: Arc<Proxy>, listener: TcpListener) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(proxy.config().limits.max_client_connections));
    let mut shutdown = proxy.shutdown.subscribe();
    proxy.accepting.store(true, Ordering::Relaxed);
    // However the loop ends, `GET /livez` stops saying it runs.
    let _accepting = ClearOnDrop(&proxy.accepting);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => {
                tracing::info!("no longer accepting connections");
                return Ok(());
            }
        };
        let (mut tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut out = BytesMut::new();
                wire::put_error(
                    &mut out,
                    &ErrorFields::fatal("53300", "rolegate: too many client connections"),
                );
                let _ = tcp.write_all(&out).await;
            });
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            session::run(proxy, tcp, peer).await;
            drop(slot);
        });
    }
}
