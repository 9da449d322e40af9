//! The `tether` binary: parses the command line and hands off to the crates.
//! `serve` is thin: load and validate the config, raise the open-file limit, start,
//! wait for SIGTERM/SIGINT, drain (a second signal stops hard), exit. SIGHUP reloads
//! the TLS certificate.

mod connect;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_server::config::{Config, Override, DEFAULT_TOML};

#[derive(Parser, Debug)]
#[command(
    name = "tether",
    version,
    about = "Tether: a real-time connection gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Client listener address.
        #[arg(long)]
        listen: Option<String>,
        /// Server API listener address.
        #[arg(long)]
        api_listen: Option<String>,
        /// This node's id.
        #[arg(long)]
        node_id: Option<String>,
    },
    /// A resilient client (the SDK) that prints every event as one JSON line.
    Connect {
        /// The WebSocket URL, e.g. ws://127.0.0.1:7700/ws.
        url: String,
        /// The client id (auth mode none).
        #[arg(long)]
        client: Option<String>,
        /// The token (auth mode jwt), sent as the first frame.
        #[arg(long)]
        token: Option<String>,
        /// A channel to subscribe to (repeatable).
        #[arg(long = "channel")]
        channels: Vec<String>,
        /// Print the client's stats as a last JSON line.
        #[arg(long)]
        stats: bool,
    },
    /// Validate a configuration or print the default one.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Publish one message through the server API.
    Publish {
        /// The API base URL.
        #[arg(long, default_value = "http://127.0.0.1:7701")]
        api: String,
        /// The channel.
        #[arg(long)]
        channel: String,
        /// The API key, if the server has one.
        #[arg(long)]
        key: Option<String>,
        /// Idempotency key (a repeat within the history TTL delivers nothing).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// The data: JSON, or any other text (sent as a JSON string).
        data: String,
    },
    /// Mint an HS256 client token for development; prints the token alone.
    Token {
        /// The HS256 secret (the server's auth.hs256_secret).
        #[arg(long)]
        secret: String,
        /// The client id (`sub`).
        #[arg(long)]
        sub: String,
        /// Channel patterns the token grants, comma-separated (`*` within a segment, `**` across).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Lifetime, e.g. 30s, 15m, 1h, 2d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// The load generator.
    Bench(tether_bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Check a configuration file; prints the bad key, value and line.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Print the default configuration with a comment per key.
    Default,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(&file),
        Command::Publish {
            api,
            channel,
            key,
            idempotency_key,
            data,
        } => publish_command(api, channel, key, idempotency_key, data),
        Command::Token {
            secret,
            sub,
            channels,
            ttl,
        } => token(&secret, &sub, &channels, &ttl),
        Command::Connect {
            url,
            client,
            token,
            channels,
            stats,
        } => connect(connect::ConnectArgs {
            url,
            client,
            token,
            channels,
            stats,
        }),
        Command::Bench(args) => bench(args),
        Command::Serve {
            config,
            listen,
            api_listen,
            node_id,
        } => serve_command(config, overrides(listen, api_listen, node_id)),
    }
}

/// `tether config check FILE`: exit 2 with the bad key, value and line.
fn config_check(file: &std::path::Path) -> ExitCode {
    match Config::from_file(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `tether publish`: prints the API's answer.
fn publish_command(
    api: String,
    channel: String,
    key: Option<String>,
    idempotency_key: Option<String>,
    data: String,
) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(publish(api, channel, key, idempotency_key, data))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether publish: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tether token`: prints the token alone; exit 2 on a bad `--ttl` or secret.
fn token(secret: &str, sub: &str, channels: &[String], ttl: &str) -> ExitCode {
    let minted = parse_ttl(ttl).and_then(|secs| {
        tether_server::auth::mint_hs256(secret, sub, channels, secs).map_err(|e| e.to_string())
    });
    match minted {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether token: {e}");
            ExitCode::from(2)
        }
    }
}

/// `tether connect`: the client's own exit code.
fn connect(args: connect::ConnectArgs) -> ExitCode {
    runtime()
        .map(|rt| ExitCode::from(rt.block_on(connect::run(args))))
        .unwrap_or_else(|e| {
            eprintln!("tether connect: {e}");
            ExitCode::FAILURE
        })
}

/// `tether bench …`.
fn bench(args: tether_bench::BenchArgs) -> ExitCode {
    runtime()
        .and_then(|rt| rt.block_on(tether_bench::run(args)))
        .map_or_else(
            |e| {
                eprintln!("tether bench: {e}");
                ExitCode::FAILURE
            },
            |()| ExitCode::SUCCESS,
        )
}

/// `serve`'s flags as configuration overrides (they win over the file and the
/// environment).
fn overrides(
    listen: Option<String>,
    api_listen: Option<String>,
    node_id: Option<String>,
) -> Vec<Override> {
    let mut flags = Vec::new();
    let mut flag = |name: &str, path: &[&str], value: Option<String>| {
        if let Some(value) = value {
            flags.push(Override {
                source_name: name.into(),
                path: path.iter().map(|s| s.to_string()).collect(),
                value,
            });
        }
    };
    flag("--listen", &["listen"], listen);
    flag("--api-listen", &["api", "listen"], api_listen);
    flag("--node-id", &["node_id"], node_id);
    flags
}

/// `tether serve`: exit 2 on a bad configuration, 1 when the server fails.
fn serve_command(config: Option<PathBuf>, flags: Vec<Override>) -> ExitCode {
    let (cfg, report) = match Config::load(config.as_deref(), std::env::vars(), flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(2);
        }
    };
    // Held until `serve` returns: dropping it flushes the log.
    let _log = init_logging(&cfg.log.level);
    for w in report.warnings {
        tracing::warn!("{w}");
    }
    match runtime().and_then(|rt| rt.block_on(serve(cfg))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("tether: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Logs to stderr through a writer thread: a log line is a queue push, never a
/// `write` syscall on the thread that logs. Lifecycle events are logged where they
/// are emitted, under the registry's or a channel's lock, so that matters. The
/// queue (tracing-appender's, 128k lines) is not lossy: when it is full a logging
/// thread waits rather than a line being dropped. Dropping the guard flushes it.
fn init_logging(level: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("tether-log")
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer)
        .init();
    guard
}

/// Raises the soft open-file limit to the hard one; returns the resulting limit.
fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024)
        }
    }
}

async fn serve(cfg: Config) -> Result<(), String> {
    let nofile = raise_nofile();
    tracing::info!(
        open_file_limit = nofile,
        ceiling = cfg.max_connections(nofile),
        "connection ceiling"
    );
    let running = tether_server::Server::start(cfg, nofile)
        .await
        .map_err(|e| e.to_string())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("cannot listen for SIGINT: {e}"))?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: draining");
                break;
            }
            _ = hup.recv() => match running.reload_tls() {
                Ok(true) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Ok(false) => tracing::info!("SIGHUP: no [tls] configured, nothing to reload"),
                Err(e) => tracing::error!("SIGHUP: TLS reload failed, keeping the current certificate: {e}"),
            },
        }
    }
    running.begin_drain();
    let app = running.app().clone();
    let second = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: stopping hard");
        app.drain.hard_stop().cancel();
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = running.wait() => {}
        _ = second => {}
    }
    tracing::info!("stopped");
    Ok(())
}

async fn publish(
    api: String,
    channel: String,
    key: Option<String>,
    idempotency_key: Option<String>,
    data: String,
) -> Result<(), String> {
    let data: serde_json::Value =
        serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data));
    let mut body = serde_json::json!({"channel": channel, "data": data});
    if let Some(k) = idempotency_key {
        body["idempotency_key"] = k.into();
    }
    let mut req = reqwest::Client::new()
        .post(format!("{}/api/publish", api.trim_end_matches('/')))
        .json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| format!("{api}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {text}"));
    }
    println!("{text}");
    Ok(())
}

/// `30s`, `15m`, `1h`, `2d` (or plain seconds) as seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("--ttl {s:?}: expected a number and s, m, h or d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("--ttl {s:?}: unit must be s, m, h or d")),
    };
    match n.checked_mul(mult) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(format!("--ttl {s:?} is out of range")),
    }
}
