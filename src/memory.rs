//! Memory goes back to the operating system after many clients have left.
//!
//! glibc's malloc returns only the top of a heap on its own; what thousands of sessions
//! freed in the middle of its heaps stays in the process until `malloc_trim` hands the
//! free pages back (measured: of 7.3 MB taken by 900 idle clients, 0.7 MB returned when
//! they left, 3.5 MB more after a trim).

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use crate::proxy::Proxy;

/// Open connections that must have gone since the last trim (or since the most there
/// were) for another.
const GONE_BEFORE_TRIM: usize = 256;

/// Every second while the proxy lives: if at least `GONE_BEFORE_TRIM` connections closed
/// since the most there were, trim (on a blocking thread: it walks the heaps).
pub async fn trim_after_clients_leave(proxy: Weak<Proxy>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut most = 0;
    loop {
        tick.tick().await;
        let Some(proxy) = proxy.upgrade() else {
            return;
        };
        let open = proxy.open_connections.load(Ordering::Relaxed);
        drop(proxy);
        most = most.max(open);
        if most - open >= GONE_BEFORE_TRIM {
            most = open;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks and releases glibc's own free lists; it takes the
    // allocator's locks like any malloc call.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
