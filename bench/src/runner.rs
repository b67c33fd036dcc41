//! One `sse-bench run`, phase by phase: sample the server, connect at the set rate, hold, run the
//! reconnect waves, publish, drain, stop every stream, account, and build the summary.
//!
//! Every phase has its own deadline, so the run as a whole is bounded whatever the server does.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cli::{HttpStyle, PublishVia, RunArgs, TokenIn};
use crate::conn::{self, Ctl, Outcome, Shared, Stats, WaveStats, lock};
use crate::procfs;
use crate::publish::{self, Channels, Plan, SentCounts, Transport};
use crate::report::{
    Connections, Deliveries, Latency, ServerSummary, Summary, TargetInfo, ToolCpu, ToolInfo, Wave,
    derive_server, per, round,
};
use crate::target::{Layout, parse_source_ips, parse_url};
use crate::token::Minter;
use crate::track::Account;

const HTTP: &[(&str, u16)] = &[("http", 80)];

fn log(quiet: bool, msg: impl AsRef<str>) {
    if !quiet {
        eprintln!("sse-bench: {}", msg.as_ref());
    }
}

pub async fn run(
    args: RunArgs,
    argv: Vec<String>,
    fds: crate::fds::Fds,
) -> Result<Summary, String> {
    args.validate()?;
    let wall = Instant::now();
    let started_unix_ms = conn::unix_ns() / 1_000_000;
    let quiet = args.quiet;
    let mut warnings = Vec::new();

    let (_, url) = parse_url(&args.url, HTTP)?;
    let source_ips = parse_source_ips(&args.source_ips)?;
    let layout = Layout {
        users: args.users(),
        apps: args.apps,
        app_prefix: args.app_prefix.clone(),
        user_prefix: args.user_prefix.clone(),
    };
    // Minter holds the key; one for the streams and one for the publisher tokens.
    let new_minter = || {
        args.secret
            .as_ref()
            .map(|s| Minter::new(s.as_bytes(), args.token_ttl))
    };
    let minter = new_minter();
    let mut extra_headers = String::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("--header {h:?}: expected Name: value"))?;
        if name.trim().is_empty() || h.contains(['\r', '\n']) {
            return Err(format!("--header {h:?}: bad header"));
        }
        extra_headers.push_str(&format!("{}: {}\r\n", name.trim(), value.trim()));
    }

    let (nofile_soft, nofile_hard) = (fds.limit, fds.hard_limit);
    let globals: Vec<u64> = if args.publish_only {
        Vec::new()
    } else {
        args.shard.indices(args.connections).collect()
    };
    if globals.len() as u64 + 64 > nofile_soft {
        warnings.push(format!(
            "{} streams but only {nofile_soft} file descriptors: split the run over more processes (--shard)",
            globals.len()
        ));
    }

    let pids: Vec<u32> = if args.no_server_stats {
        Vec::new()
    } else if !args.server_pids.is_empty() {
        args.server_pids.clone()
    } else {
        procfs::pids_listening_on(url.addr.port())
    };
    if pids.is_empty() && !args.no_server_stats {
        warnings.push("no server process found: server RSS and CPU not measured".into());
    }
    log(
        quiet,
        format!(
            "server pids {pids:?}; {} streams in this process",
            globals.len()
        ),
    );

    if let Some(at) = args.start_at {
        let now = conn::unix_ns() / 1_000_000;
        let wait = at.saturating_sub(now).min(120_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }

    let sh = Arc::new(Shared {
        target: url.addr,
        host_header: url.host_header.clone(),
        path_template: url.path.clone(),
        token_in: args.token_in,
        token_param: args.token_param.clone(),
        extra_headers,
        minter: if args.token_in == TokenIn::None {
            None
        } else {
            new_minter()
        },
        send_last_event_id: args.last_event_id,
        layout: layout.clone(),
        source_ips: source_ips.clone(),
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
        run_start: Instant::now(),
        stats: Stats::new(args.reconnect_waves),
        live: (0..globals.len()).map(|_| AtomicBool::new(false)).collect(),
        connect_trace: args
            .connect_trace
            .as_ref()
            .map(|_| std::sync::Mutex::new(Vec::new())),
    });
    let sample = || procfs::sample(&pids);
    let mut server = ServerSummary {
        pids: pids.clone(),
        before: sample(),
        ..ServerSummary::default()
    };

    // ---- connect ----
    let (ctl_tx, ctl_rx) = watch::channel(Ctl {
        wave: 0,
        stop: false,
        wave_start: Instant::now(),
        rate: 0.0,
    });
    let progress = tokio::spawn(progress(sh.clone(), ctl_rx.clone(), quiet));
    let cpu0 = procfs::self_cpu();
    let me = std::process::id();
    let tool_rss_start = procfs::rss_kib(me).unwrap_or(0);
    let t0 = sh.run_start;
    let phase_limit = Duration::from_secs_f64(args.connect_phase_timeout);
    let mut handles: Vec<JoinHandle<Outcome>> = Vec::with_capacity(globals.len());
    for (local, &global) in globals.iter().enumerate() {
        if args.connect_rate > 0.0 {
            let at = t0 + Duration::from_secs_f64(local as f64 / args.connect_rate);
            tokio::time::sleep_until(at.into()).await;
        }
        if t0.elapsed() > phase_limit {
            warnings.push(format!(
                "connect phase limit reached: {} streams never started",
                globals.len() - local
            ));
            break;
        }
        handles.push(tokio::spawn(conn::connection(
            sh.clone(),
            local,
            global,
            ctl_rx.clone(),
        )));
    }
    let started = handles.len() as u64;
    wait_wave(&sh.stats.waves[0], started, t0 + phase_limit).await;
    let w0 = &sh.stats.waves[0];
    let connect_secs = w0.last_ok_us.load(Relaxed) as f64 / 1e6;
    let cpu1 = procfs::self_cpu();
    log(
        quiet,
        format!(
            "connected {} of {} in {connect_secs:.2} s",
            w0.ok.load(Relaxed),
            globals.len()
        ),
    );
    if let Some(f) = &args.ready_file {
        write_file(f, &format!("{}\n", sh.stats.open.load(Relaxed)))?;
    }

    // ---- hold ----
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    server.after_connect = sample();
    let tool_rss_connected = procfs::rss_kib(me).unwrap_or(0);

    // ---- reconnect waves and publishing (one after the other, or together) ----
    for f in &args.wait_for {
        wait_file(f, phase_limit).await;
    }
    let live_before_waves: Vec<bool> = sh.live.iter().map(|l| l.load(Relaxed)).collect();
    let waves_run = async {
        let mut waves = Vec::new();
        if args.publish_during_waves && args.reconnect_waves > 0 {
            tokio::time::sleep(Duration::from_secs_f64(args.waves_after)).await;
        }
        for w in 1..=args.reconnect_waves {
            let start = Instant::now();
            let offset = start.duration_since(t0);
            let _ = ctl_tx.send(Ctl {
                wave: w,
                stop: false,
                wave_start: start,
                rate: args.reconnect_rate,
            });
            let ws = &sh.stats.waves[w as usize];
            wait_wave(ws, started, start + phase_limit).await;
            let last = Duration::from_micros(ws.last_ok_us.load(Relaxed));
            let secs = last.saturating_sub(offset).as_secs_f64();
            let mut wave = wave_summary(ws, w, args.reconnect_rate);
            wave.secs_to_all = round(secs, 3);
            wave.rate_achieved = per(wave.ok as f64, secs).map_or(0.0, |r| round(r, 1));
            log(quiet, format!("wave {w}: {} back in {secs:.2} s", wave.ok));
            waves.push(wave);
            tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
        }
        let after = (args.reconnect_waves > 0).then(sample).flatten();
        (waves, after)
    };
    let publishing = async {
        let mut warnings = Vec::new();
        let mut summary = None;
        let mut sent: Option<SentCounts> = None;
        let live_now: Vec<bool> = sh.live.iter().map(|l| l.load(Relaxed)).collect();
        let server_at_start = sample();
        let cpu0 = procfs::self_cpu();
        let t = Instant::now();
        if args.publish != PublishVia::None && args.messages > 0 {
            let transport = make_transport(&args, &layout, &url, minter.as_ref()).await?;
            let plan = Plan {
                pattern: args.pattern,
                messages: args.messages,
                rate: args.rate,
                max_duration: Duration::from_secs_f64(args.publish_duration),
                pad: args.payload_pad,
                seed: args.seed,
            };
            log(
                quiet,
                format!("publishing {} messages at {}/s", args.messages, args.rate),
            );
            let mode = match (args.publish, args.http_style) {
                (PublishVia::Http, HttpStyle::Gateway) => "http-gateway",
                (PublishVia::Http, HttpStyle::GatewayDurable) => "http-gateway-durable",
                (PublishVia::Http, HttpStyle::Nchan) => "http-nchan",
                (PublishVia::Http, HttpStyle::Pushpin) => "http-pushpin",
                (PublishVia::Durable, _) if args.durable_keyed => "durable-keyed",
                (p, _) => p.name(),
            };
            let (counts, s, w) = publish::run(&plan, transport, &layout, mode).await;
            warnings.extend(w);
            if let Some(f) = &args.sent_file {
                let json = serde_json::to_string(&counts).map_err(|e| e.to_string())?;
                write_file(f, &json)?;
            }
            summary = Some(s);
            sent = Some(counts);
        } else if let Some(f) = &args.sent_file {
            // Another process publishes: its counts arrive when it is done.
            let limit = Duration::from_secs_f64(args.publish_duration) + phase_limit;
            if wait_file(f, limit).await {
                match std::fs::read_to_string(f)
                    .map_err(|e| e.to_string())
                    .and_then(|s| serde_json::from_str::<SentCounts>(&s).map_err(|e| e.to_string()))
                {
                    Ok(c) => sent = Some(c),
                    Err(e) => warnings.push(format!("{}: {e}", f.display())),
                }
            } else {
                warnings.push(format!(
                    "{} never appeared: losses at the tail not counted",
                    f.display()
                ));
            }
        }
        Ok::<_, String>((summary, sent, warnings, cpu0, t, live_now, server_at_start))
    };
    let ((waves, after_waves), published) = if args.publish_during_waves {
        tokio::join!(waves_run, publishing)
    } else {
        let w = waves_run.await;
        (w, publishing.await)
    };
    server.after_waves = after_waves;
    let (publish_summary, sent, publish_warnings, pub_cpu0, pub_t0, live_now, server_at_start) =
        published?;
    if publish_summary.is_some() || sent.is_some() {
        server.publish_start = server_at_start;
    }
    warnings.extend(publish_warnings);
    // With waves during publishing, the streams open before the waves are the ones expected to
    // get everything (through replay); otherwise those open when publishing began.
    let live_at_publish = if args.publish_during_waves {
        live_before_waves
    } else {
        live_now
    };

    // ---- drain ----
    let mut complete = true;
    if let Some(counts) = &sent {
        let expected: u64 = globals
            .iter()
            .zip(&live_at_publish)
            .filter(|(_, live)| **live)
            .map(|(&g, _)| {
                let u = layout.user_of(g);
                let a = layout.app_of(u);
                counts.user.get(u as usize).copied().unwrap_or(0) as u64
                    + counts.app.get(a as usize).copied().unwrap_or(0) as u64
            })
            .sum();
        let deadline = Instant::now() + Duration::from_secs_f64(args.drain);
        while sh.stats.fresh.load(Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        complete = sh.stats.fresh.load(Relaxed) >= expected;
    }
    let pub_secs = pub_t0.elapsed().as_secs_f64();
    let pub_cpu1 = procfs::self_cpu();
    if publish_summary.is_some() || sent.is_some() {
        server.after_publish = sample();
    }

    // ---- stop ----
    let _ = ctl_tx.send(Ctl {
        wave: args.reconnect_waves,
        stop: true,
        wave_start: Instant::now(),
        rate: 0.0,
    });
    let open_at_end = sh.stats.open.load(Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut outcomes = Vec::with_capacity(handles.len());
    for h in handles {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, h).await {
            Ok(Ok(o)) => outcomes.push(Some(o)),
            _ => outcomes.push(None),
        }
    }
    progress.abort();

    // ---- account ----
    let mut acc = Account::default();
    let mut unaccounted = 0u64;
    for (o, live) in outcomes.iter().zip(&live_at_publish) {
        let Some(o) = o else {
            unaccounted += 1;
            continue;
        };
        if !*live {
            continue;
        }
        match &sent {
            Some(c) => {
                acc += o
                    .unicast
                    .account(c.user.get(o.user as usize).copied().unwrap_or(0));
                acc += o
                    .broadcast
                    .account(c.app.get(o.app as usize).copied().unwrap_or(0));
            }
            // Without the publisher's counts only gaps are visible, not a lost tail.
            None => {
                acc += o.unicast.account(o.unicast.highest());
                acc += o.broadcast.account(o.broadcast.highest());
            }
        }
    }
    if unaccounted > 0 {
        warnings.push(format!(
            "{unaccounted} connections did not stop in time and are not accounted"
        ));
    }
    if sent.is_none() && acc.received > 0 {
        warnings
            .push("no sent counts: lost counts only gaps, not messages missing at the end".into());
    }

    let stats = &sh.stats;
    let deliveries = {
        let first = stats.first_delivery_ns.load(Relaxed);
        let last = stats.last_delivery_ns.load(Relaxed);
        let from = publish_summary
            .as_ref()
            .map(|p| p.start_unix_ns)
            .unwrap_or(first);
        Deliveries {
            expected: acc.received + acc.lost,
            received: acc.received,
            lost: acc.lost,
            duplicated: acc.duplicated,
            unexpected: acc.unexpected,
            pings: stats.pings.load(Relaxed),
            comments: stats.comments.load(Relaxed),
            other_events: stats.other_events.load(Relaxed),
            throughput_per_sec: per(acc.received as f64, last.saturating_sub(from) as f64 / 1e9)
                .map_or(0.0, |r| round(r, 1)),
            first_unix_ns: first,
            last_unix_ns: last,
            complete: complete && acc.lost == 0,
            latency: Latency::from_histogram(&lock(&stats.latency)),
        }
    };
    let w0 = &stats.waves[0];
    let connections = Connections {
        requested: globals.len() as u64,
        ok: w0.ok.load(Relaxed),
        failed: w0.failed.load(Relaxed) + (globals.len() as u64 - started),
        failed_by_reason: lock(&w0.reasons).clone(),
        dropped: stats.dropped.load(Relaxed),
        dropped_by_reason: lock(&stats.drop_reasons).clone(),
        open_at_end,
        rate_requested: args.connect_rate,
        rate_achieved: per(w0.ok.load(Relaxed) as f64, connect_secs).map_or(0.0, |r| round(r, 1)),
        phase_secs: round(connect_secs, 3),
        latency: Latency::from_histogram(&lock(&w0.latency)),
        nofile_soft,
        nofile_hard,
    };
    let server = if pids.is_empty() {
        None
    } else {
        derive_server(&mut server, connections.ok, deliveries.received);
        // /proc counts CPU in clock ticks (10 ms): a short phase cannot be measured precisely.
        if server.cpu_secs_publish.is_some_and(|c| c < 0.2) {
            warnings.push(
                "server CPU in the publish phase under 0.2 s: per-delivery CPU figures are coarse \
                 (10 ms ticks); publish more messages"
                    .into(),
            );
        }
        Some(server)
    };
    let (user, sys) = procfs::self_cpu();
    // Only a process that published or waited for deliveries has a publish phase to speak of.
    let pub_cpu = if publish_summary.is_some() || sent.is_some() {
        (pub_cpu1.0 + pub_cpu1.1) - (pub_cpu0.0 + pub_cpu0.1)
    } else {
        0.0
    };
    if let (Some(path), Some(trace)) = (&args.connect_trace, &sh.connect_trace) {
        let lines: String = lock(trace)
            .iter()
            .map(|(wave, start, us)| format!("{wave} {start} {us}\n"))
            .collect();
        write_file(path, &lines)?;
    }
    Ok(Summary {
        tool: ToolInfo {
            name: "sse-bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            label: args.label.clone().unwrap_or_default(),
            shard: format!("{}/{}", args.shard.index, args.shard.count),
            processes: 1,
            threads: args.threads,
            started_unix_ms,
            wall_secs: round(wall.elapsed().as_secs_f64(), 3),
            args: argv,
        },
        machine: procfs::machine(),
        target: TargetInfo {
            url: args.url.clone(),
            token_in: format!("{:?}", args.token_in).to_ascii_lowercase(),
            users: layout.users,
            apps: layout.apps,
            connections_total: args.connections,
            source_ips: source_ips.len(),
        },
        connections,
        waves,
        publish: publish_summary,
        deliveries,
        server,
        tool_cpu: ToolCpu {
            user_secs: round(user, 3),
            sys_secs: round(sys, 3),
            connect_phase_secs: round((cpu1.0 + cpu1.1) - (cpu0.0 + cpu0.1), 3),
            publish_phase_secs: round(pub_cpu, 3),
            publish_phase_util: per(pub_cpu, pub_secs).map_or(0.0, |r| round(r, 3)),
            rss_kib_start: tool_rss_start,
            rss_kib_connected: tool_rss_connected,
        },
        warnings,
    })
}

async fn make_transport(
    args: &RunArgs,
    layout: &Layout,
    url: &crate::target::Url,
    minter: Option<&Minter>,
) -> Result<Transport, String> {
    let dotted = matches!(args.http_style, HttpStyle::Nchan | HttpStyle::Pushpin)
        && args.publish == PublishVia::Http;
    let user_tpl = args.channel_user.clone().unwrap_or_else(|| {
        if dotted {
            "{app}.{user}"
        } else {
            "{app}:channel:{user}"
        }
        .into()
    });
    let app_tpl = args.channel_broadcast.clone().unwrap_or_else(|| {
        if dotted {
            "{app}.broadcast"
        } else {
            "{app}:broadcast"
        }
        .into()
    });
    let channels = Channels::new(layout, &user_tpl, &app_tpl);
    match args.publish {
        PublishVia::Redis | PublishVia::Durable => {
            let (_, r) = parse_url(&args.redis_url, &[("redis", 6379)])?;
            let password = args
                .redis_url
                .split_once("://")
                .and_then(|(_, rest)| rest.split_once('@'))
                .and_then(|(cred, _)| cred.rsplit_once(':').map(|(_, p)| p.to_string()))
                .filter(|p| !p.is_empty());
            let command = match (args.publish, args.durable_keyed) {
                (PublishVia::Durable, false) => publish::RedisCommand::Durable,
                (PublishVia::Durable, true) => publish::RedisCommand::DurableKeyed,
                _ => publish::RedisCommand::Publish,
            };
            Ok(Transport::Redis(
                publish::Redis::connect(
                    r.addr,
                    password,
                    command,
                    layout,
                    channels,
                    &args.event_type,
                )
                .await?,
            ))
        }
        PublishVia::Http => {
            let publish_url = match &args.http_publish_url {
                Some(u) => parse_url(u, HTTP)?.1,
                None => crate::target::Url {
                    path: "/publish".into(),
                    ..url.clone()
                },
            };
            let options = publish::HttpOptions {
                url: publish_url,
                style: args.http_style,
                conns: args.http_publish_conns,
                minter,
                publisher_user: &args.publisher_user,
                event_type: &args.event_type,
            };
            Ok(Transport::Http(publish::Http::start(
                options, channels, layout,
            )?))
        }
        PublishVia::None => Err("nothing to publish with".into()),
    }
}

/// Waits until every started connection of the wave succeeded or failed, or the deadline.
async fn wait_wave(ws: &WaveStats, started: u64, deadline: Instant) {
    while ws.done() < started && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn wave_summary(ws: &WaveStats, wave: u32, rate: f64) -> Wave {
    Wave {
        wave,
        ok: ws.ok.load(Relaxed),
        failed: ws.failed.load(Relaxed),
        failed_by_reason: lock(&ws.reasons).clone(),
        rate_requested: rate,
        latency: Latency::from_histogram(&lock(&ws.latency)),
        ..Wave::default()
    }
}

/// Waits for a file to exist (bounded); true if it does.
async fn wait_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Writes through a temporary name and renames, so a waiting process never reads half a file.
fn write_file(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// One line a second on stderr, so a long run shows it is alive; ends with the run.
async fn progress(sh: Arc<Shared>, mut ctl: watch::Receiver<Ctl>, quiet: bool) {
    if quiet {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = ctl.changed() => {
                if r.is_err() || ctl.borrow().stop {
                    return;
                }
                continue;
            }
        }
        let s = &sh.stats;
        let failed: u64 = s.waves.iter().map(|w| w.failed.load(Relaxed)).sum();
        eprintln!(
            "sse-bench: t={:.0}s open={} failed={} dropped={} delivered={} pings={}",
            sh.run_start.elapsed().as_secs_f64(),
            s.open.load(Relaxed),
            failed,
            s.dropped.load(Relaxed),
            s.fresh.load(Relaxed),
            s.pings.load(Relaxed),
        );
    }
}
