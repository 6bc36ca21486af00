//! The accept loop: one task per client connection, bounded by max_client_connections.

use std::sync::Arc;

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

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

/// `count` listening sockets on one address, for `runtime = "per_thread"`: each thread
/// accepts on its own, and the kernel (`SO_REUSEPORT`) spreads new connections over
/// them. Port 0 picks a free port for the first; the others join it there. Each socket
/// becomes a tokio listener on the thread that serves it (`TcpListener::from_std`).
///
/// `SO_REUSEPORT` would also let a second rolegate (a double start, a deploy overlap)
/// join the port and take a share of the clients without a word: the address is first
/// bound without it, which fails as a plain bind does while anything listens there.
pub fn bind_per_thread(listen: &str, count: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use std::net::ToSocketAddrs;
    let mut last_error = None;
    for address in listen
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {listen}"))?
    {
        match bind_group(address, count) {
            Ok(sockets) => return Ok(sockets),
            Err(e) => last_error = Some(e),
        }
    }
    match last_error {
        Some(e) => Err(e).with_context(|| format!("cannot listen on {listen}")),
        None => anyhow::bail!("cannot listen on {listen}: it names no address"),
    }
}

fn bind_group(
    address: std::net::SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let free = listener_socket(address, false)?.local_addr()?;
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        sockets.push(listener_socket(free, true)?);
    }
    tracing::info!(address = %free, threads = count, runtime = "per_thread", "rolegate is listening");
    Ok(sockets)
}

/// A listening socket on `address`, in the `SO_REUSEPORT` group there if `group`.
fn listener_socket(
    address: std::net::SocketAddr,
    group: bool,
) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // As tokio's and std's binds: connections of an earlier run in TIME_WAIT do not
    // hold the port.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(group)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    // tokio's own `TcpListener::bind` backlog.
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Sets its flag to false when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

pub async fn accept_loop(proxy: Arc<Proxy>, listener: TcpListener) -> anyhow::Result<()> {
    let slots = proxy.client_slots.clone();
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
