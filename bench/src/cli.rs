//! Command-line interface: `sse-bench run` (open streams, publish, measure), `sse-bench merge`
//! (combine the JSON summaries of a split run) and `sse-bench floor` (the kernel's share). Every numeric option is range-checked here so the
//! rest of the tool can rely on bounded counts and durations.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::target::Shard;

#[derive(Parser, Debug)]
#[command(
    name = "sse-bench",
    version,
    about = "Load generator for Server-Sent Events servers (loopback targets only)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open SSE streams, optionally publish, and print one JSON summary on stdout.
    Run(Box<RunArgs>),
    /// The kernel's share: CPU per small write to N loopback sockets read by another process,
    /// with no server logic at all (the floor under any server's CPU per delivery here).
    Floor {
        /// Sockets written to, like streams of a broadcast.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=19_000))]
        streams: u32,
        /// Messages written to every socket.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        messages: u32,
        /// Messages per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Bytes per message (an SSE event of the scenarios, framed, is about 100).
        #[arg(long, default_value_t = 106, value_parser = clap::value_parser!(u32).range(1..=65_536))]
        bytes: u32,
        /// Write the sockets in a random order instead of the order they were created in.
        #[arg(long)]
        shuffle: bool,
    },
    /// The reading side of `floor` (started by it).
    #[command(hide = true)]
    FloorReader {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        streams: u32,
        #[arg(long)]
        total: u64,
    },
    /// Merge the JSON summaries of the processes of one split run into one summary.
    Merge {
        /// Summary files written by `run --out` (or captured stdout).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        label: Option<String>,
        /// Also write the merged summary here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenIn {
    /// `Authorization: Bearer <jwt>`.
    Header,
    /// `?<token-param>=<jwt>` on the URL.
    Query,
    /// No token (servers without auth, e.g. the Nchan and Pushpin peer configs).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishVia {
    None,
    /// Redis `PUBLISH <channel> <envelope>` (sse-gateway's broker protocol).
    Redis,
    /// sse-gateway's durable path: Redis `FCALL sse_publish 0 <app> <user or ""> <envelope>` (the
    /// Redis Function the gateway loads), which writes history and then publishes.
    Durable,
    /// HTTP POST, in the style chosen by `--http-style`.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Each message goes to one random user's channel.
    Unicast,
    /// Each message goes to every app's broadcast channel (every stream of the app).
    Broadcast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HttpStyle {
    /// sse-gateway `POST /publish` with a publisher token, `"durable": false` and our own ids:
    /// the fire-and-forget path, like a Redis `PUBLISH`.
    Gateway,
    /// sse-gateway `POST /publish`, durable (the gateway assigns ids and keeps history for replay).
    GatewayDurable,
    /// Nchan publisher location: `POST <url with {channel}>`, the body is the event data.
    Nchan,
    /// Pushpin's control API: `POST /publish/` with GRIP `http-stream` items.
    Pushpin,
}

impl PublishVia {
    pub fn name(self) -> &'static str {
        match self {
            PublishVia::None => "none",
            PublishVia::Redis => "redis",
            PublishVia::Durable => "durable",
            PublishVia::Http => "http",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    // ---- the streams ----
    /// Subscriber URL; the path may use {app}, {user} and {conn}. Loopback hosts only.
    #[arg(long, default_value = "http://127.0.0.1:8080/sse")]
    pub url: String,
    #[arg(long, value_enum, default_value = "header")]
    pub token_in: TokenIn,
    /// Query parameter carrying the token with `--token-in query`.
    #[arg(long, default_value = "access_token")]
    pub token_param: String,
    /// HS256 secret tokens are minted with.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    #[arg(long, default_value_t = 3600)]
    pub token_ttl: u64,
    /// Extra request header for every stream, `Name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// On reconnect, send `Last-Event-ID` with the last numeric id the stream saw.
    #[arg(long)]
    pub last_event_id: bool,

    /// Streams in the whole run (all shards together).
    #[arg(long, short = 'n', default_value_t = 100)]
    pub connections: u64,
    /// Distinct users (default: one per connection). Connection i is user i % users.
    #[arg(long)]
    pub users: Option<u32>,
    /// Apps; user u belongs to app u % apps.
    #[arg(long, default_value_t = 1)]
    pub apps: u32,
    #[arg(long, default_value = "app")]
    pub app_prefix: String,
    #[arg(long, default_value = "u")]
    pub user_prefix: String,
    /// This process's share of a split run: i/n takes connections i, i+n, i+2n, ...
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Open no streams (the publishing process of a split run).
    #[arg(long)]
    pub publish_only: bool,
    /// Loopback source addresses, e.g. 127.0.0.1-127.0.0.8; connection i binds address i % count.
    #[arg(long, default_value = "127.0.0.1-127.0.0.8")]
    pub source_ips: String,

    // ---- connecting ----
    /// New streams per second for this process (0: all at once).
    #[arg(long, default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// Per stream: TCP connect to first body byte, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Longest the connect phase (and each reconnect wave) may take, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub connect_phase_timeout: f64,
    /// Seconds to hold the streams idle after connecting, before sampling the server's RSS.
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,
    /// Times every stream closes and reconnects at once after the hold (a deploy's reconnect storm).
    #[arg(long, default_value_t = 0)]
    pub reconnect_waves: u32,
    /// Publish while the reconnect waves run (with `--last-event-id` and durable publishing, what
    /// a stream missed while away must be replayed: any loss shows).
    #[arg(long)]
    pub publish_during_waves: bool,
    /// With `--publish-during-waves`: seconds of publishing before the first wave, so that every
    /// stream has an event id to resume from (a stream that saw no event cannot resume).
    #[arg(long, default_value_t = 1.0)]
    pub waves_after: f64,
    /// Reconnects per second within a wave (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    pub reconnect_rate: f64,

    // ---- publishing ----
    #[arg(long, value_enum, default_value = "none")]
    pub publish: PublishVia,
    #[arg(long, value_enum, default_value = "unicast")]
    pub pattern: Pattern,
    /// Messages to publish (a broadcast message counts once, whatever the number of apps).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// Messages per second (0: as fast as possible, a burst).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Longest the publishing may take, seconds; the rest is not sent.
    #[arg(long, default_value_t = 60.0)]
    pub publish_duration: f64,
    /// Longest to wait for outstanding deliveries after the last publish, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Extra bytes of padding in each message's data.
    #[arg(long, default_value_t = 0)]
    pub payload_pad: usize,
    /// Event type of published messages (where the publish protocol carries one).
    #[arg(long, default_value = "bench")]
    pub event_type: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// With `--publish durable`: the Redis Cluster form, `FCALL sse_publish 1 {<app>} <app> ...`
    /// (the application's hash tag as the one key). `--redis-url` must name the primary that holds
    /// the slot of `{<app>}`: the tool keeps one connection and follows no redirect.
    #[arg(long)]
    pub durable_keyed: bool,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// A user's channel name, {app} and {user} substituted. Default: `{app}:channel:{user}` for
    /// Redis, `{app}.{user}` for the Nchan and Pushpin styles.
    #[arg(long)]
    pub channel_user: Option<String>,
    /// An app's broadcast channel. Default: `{app}:broadcast`, or `{app}.broadcast`.
    #[arg(long)]
    pub channel_broadcast: Option<String>,
    /// Where to POST; may use {channel}. Default: `/publish` on the stream URL's host (gateway).
    #[arg(long)]
    pub http_publish_url: Option<String>,
    #[arg(long, value_enum, default_value = "gateway")]
    pub http_style: HttpStyle,
    /// Parallel keep-alive HTTP connections used to publish.
    #[arg(long, default_value_t = 4)]
    pub http_publish_conns: usize,
    /// `sub` of the publisher tokens (one per app) for the gateway style.
    #[arg(long, default_value = "bench-publisher")]
    pub publisher_user: String,

    // ---- coordinating the processes of a split run ----
    /// Start (sample the server, then connect) at this Unix time in milliseconds.
    #[arg(long)]
    pub start_at: Option<u64>,
    /// Written (with the count of open streams) once the connect phase is over.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Before publishing, wait until these files exist (other shards' ready files).
    #[arg(long = "wait-for")]
    pub wait_for: Vec<PathBuf>,
    /// The publisher writes its per-channel sent counts here; a process that does not publish
    /// waits for it and uses it to count lost messages exactly.
    #[arg(long)]
    pub sent_file: Option<PathBuf>,

    // ---- measurement ----
    /// Server process to sample (repeatable). Default: every process listening on the URL's port.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    #[arg(long)]
    pub no_server_stats: bool,
    /// Writes every established stream's connect as a line `<wave> <start µs> <latency µs>`
    /// (start from the run's start): a timeline, to tell a periodic stall from a steady tail.
    #[arg(long)]
    pub connect_trace: Option<PathBuf>,
    /// Tokio worker threads (1: a single-threaded runtime, the cheapest per event).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Hard limit on the whole run, seconds: the tool exits (status 3) when it is reached.
    #[arg(long, default_value_t = 900.0)]
    pub max_run: f64,
    #[arg(long)]
    pub label: Option<String>,
    /// Also write the summary to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

impl RunArgs {
    /// Range checks, so that every loop the run makes is bounded.
    pub fn validate(&self) -> Result<(), String> {
        let secs = |name: &str, v: f64, max: f64| {
            if v.is_finite() && (0.0..=max).contains(&v) {
                Ok(())
            } else {
                Err(format!("--{name} must be between 0 and {max}"))
            }
        };
        if self.connections > 1_000_000 {
            return Err("--connections is at most 1,000,000".into());
        }
        if self.users == Some(0) || self.apps == 0 {
            return Err("--users and --apps must be at least 1".into());
        }
        if self.messages > 100_000_000 {
            return Err("--messages is at most 100,000,000".into());
        }
        secs("rate", self.rate, 10_000_000.0)?;
        secs("connect-rate", self.connect_rate, 1_000_000.0)?;
        secs("reconnect-rate", self.reconnect_rate, 1_000_000.0)?;
        secs("connect-timeout", self.connect_timeout, 600.0)?;
        secs("connect-phase-timeout", self.connect_phase_timeout, 3600.0)?;
        secs("hold", self.hold, 3600.0)?;
        secs("publish-duration", self.publish_duration, 3600.0)?;
        secs("drain", self.drain, 600.0)?;
        secs("waves-after", self.waves_after, 600.0)?;
        secs("max-run", self.max_run, 4.0 * 3600.0)?;
        if self.reconnect_waves > 100 {
            return Err("--reconnect-waves is at most 100".into());
        }
        if self.payload_pad > 1 << 20 {
            return Err("--payload-pad is at most 1 MiB".into());
        }
        if !(1..=64).contains(&self.http_publish_conns) {
            return Err("--http-publish-conns must be 1 to 64".into());
        }
        if !(1..=64).contains(&self.threads) {
            return Err("--threads must be 1 to 64".into());
        }
        if self.token_in != TokenIn::None && self.secret.is_none() {
            return Err(
                "--secret (or JWT_SECRET) is needed to mint tokens; or use --token-in none".into(),
            );
        }
        if self.publish == PublishVia::Http
            && matches!(
                self.http_style,
                HttpStyle::Gateway | HttpStyle::GatewayDurable
            )
            && self.secret.is_none()
        {
            return Err("the gateway publish style needs --secret for publisher tokens".into());
        }
        if self.durable_keyed && self.publish != PublishVia::Durable {
            return Err("--durable-keyed goes with --publish durable".into());
        }
        Ok(())
    }

    pub fn users(&self) -> u32 {
        self.users
            .unwrap_or_else(|| self.connections.clamp(1, u32::MAX as u64) as u32)
    }
}
