//! The reference server of efr-load's tests as a standalone program, to try efr-load by hand
//! and to measure the tool's own cost against a server in another process:
//! `cargo run --release --example load_reference_server -- [EVENT_PORT] [CLIENT_PORT]`
//! (defaults 9090 and 9099). Serves sessions until killed.

#[path = "../tests/load_support/refserver.rs"]
mod refserver;

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u16>().expect("a port number"));
    let event_port = args.next().unwrap_or(9090);
    let client_port = args.next().unwrap_or(9099);
    let server = refserver::start_on(event_port, client_port, refserver::Fault::None);
    eprintln!(
        "reference server: events on 127.0.0.1:{}, clients on 127.0.0.1:{}",
        server.event_port, server.client_port
    );
    loop {
        std::thread::park();
    }
}
