//! A bare byte relay: tokio `copy_bidirectional`, no parsing, no auth, no TLS. The floor
//! any user-space proxy sits on; `benches/pgbench.sh` runs it beside rolegate.
//!
//! Usage: bare_relay LISTEN_ADDR TARGET_ADDR

use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(target)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_relay LISTEN_ADDR TARGET_ADDR");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(&listen).await?;
    loop {
        let (mut client, _) = listener.accept().await?;
        let target = target.clone();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}
