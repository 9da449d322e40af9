//! `tether connect`: the Rust SDK (`tether-client`) as a command. Prints every event as
//! one JSON line (SPEC section 1), closes cleanly on SIGINT or SIGTERM, and tells by
//! its exit code how the client ended: 0 after a clean close (its own, or a server
//! close that says not to reconnect), 1 after a fatal one, 2 for bad arguments.

use std::io::Write;

use tether_client::{ClientBuilder, Event, State};

/// The command's arguments.
pub struct ConnectArgs {
    /// `ws://host:port/ws`.
    pub url: String,
    /// The client id (auth mode none).
    pub client: Option<String>,
    /// The token (auth mode jwt).
    pub token: Option<String>,
    /// Channels to subscribe to.
    pub channels: Vec<String>,
    /// Print a last `{"event":"stats",…}` line.
    pub stats: bool,
}

/// Runs the client until it is closed; returns the exit code.
pub async fn run(args: ConnectArgs) -> u8 {
    let mut b = ClientBuilder::new(args.url);
    if let Some(c) = args.client {
        b = b.client_id(c);
    }
    if let Some(t) = args.token {
        b = b.token(t);
    }
    for ch in args.channels {
        b = b.channel(ch);
    }
    let mut client = match b.connect() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether connect: {e}");
            return 2;
        }
    };
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tether connect: {e}");
            return 2;
        }
    };
    let mut code = 1; // the stream ending without `closed` is not a clean end
    loop {
        let event = tokio::select! {
            e = client.next_event() => e,
            () = signals.recv() => {
                client.close();
                continue;
            }
        };
        let Some(event) = event else { break };
        if let Event::State(s) = &event {
            if s.state == State::Closed {
                code = u8::from(s.fatal);
            }
        }
        if !print(&event.to_line()) {
            client.close(); // stdout is gone: nobody is listening
        }
    }
    if args.stats {
        print(&client.stats().to_line());
    }
    code
}

fn print(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}
