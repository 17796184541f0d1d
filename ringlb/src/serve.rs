//! `ringlb run` and the serving half of `ringlb demo`: start the datapath engine, run the control
//! thread (a current-thread tokio runtime: the source, its health probes, the admin listener,
//! signals) until SIGINT or SIGTERM, then shut down gracefully: the listeners close at once
//! (`/readyz` turns 503), established connections and UDP flows go on for `--shutdown-grace`, then
//! what is left is closed and ringlb exits 0; a second signal closes everything at once.
//!
//! The main thread becomes the control thread; datapath workers are the engine's own pinned threads.
//! The only thing handed from control to datapath is a `Snapshot`, through `Engine::publish`.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use lb_core::{BuildOptions, EntryPolicy, NotReadyConnections, Snapshot, StaleFlowPolicy};
use lb_datapath::{Engine, EngineConfig, RelayMode, UdpConfig};
use lb_sync::{ControlLoop, HealthStatus, ManifestSource, Readiness, SnapshotSink};
use serde_json::json;

use crate::admin::{self, AdminState};
use crate::cli::{AdminArgs, DefaultsArgs, EngineArgs, NotReadyArg, RelayArg, RunArgs, StaleFlowsArg};

/// Where the served snapshots come from.
#[allow(clippy::large_enum_variant, reason = "one value per process, moved once")]
pub enum Source {
    /// Manifest files, followed as they change, and the control loop that builds from them.
    Manifests(ManifestSource, ControlLoop),
    /// One snapshot built up front (the demo).
    Fixed(Snapshot),
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let source = ManifestSource::new(args.manifests);
    let control = ControlLoop::new(build_options(&args.defaults));
    serve(Source::Manifests(source, control), &args.engine, &args.admin)
}

pub fn build_options(defaults: &DefaultsArgs) -> BuildOptions {
    let fallback = EntryPolicy::default();
    BuildOptions {
        default_scheduler: defaults.scheduler,
        default_policy: EntryPolicy {
            connect_timeout: defaults.connect_timeout.unwrap_or(fallback.connect_timeout),
            idle_timeout: defaults.idle_timeout.unwrap_or(fallback.idle_timeout),
            drain_timeout: defaults.drain_timeout.unwrap_or(fallback.drain_timeout),
            not_ready_connections: match defaults.not_ready_connections {
                NotReadyArg::Drain => NotReadyConnections::Drain,
                NotReadyArg::Keep => NotReadyConnections::Keep,
                NotReadyArg::Close => NotReadyConnections::Close,
            },
            udp_unreplied_timeout: defaults.udp_unreplied_timeout.unwrap_or(fallback.udp_unreplied_timeout),
            udp_replied_timeout: defaults.udp_replied_timeout.unwrap_or(fallback.udp_replied_timeout),
            udp_stale_flows: match defaults.udp_stale_flows {
                StaleFlowsArg::Move => StaleFlowPolicy::Move,
                StaleFlowsArg::Drain => StaleFlowPolicy::Drain,
            },
            ..fallback
        },
        node_name: defaults.node_name.clone(),
        ..BuildOptions::default()
    }
}

pub fn engine_config(args: &EngineArgs) -> EngineConfig {
    let defaults = EngineConfig::default();
    EngineConfig {
        workers: args.workers.unwrap_or(defaults.workers).max(1),
        pin_workers: !args.no_pin,
        relay: match args.relay {
            RelayArg::Auto => RelayMode::Auto,
            RelayArg::Copy => RelayMode::Copy,
            RelayArg::Splice => RelayMode::Splice,
        },
        udp: UdpConfig {
            max_flows_per_worker: args.udp_max_flows.unwrap_or(defaults.udp.max_flows_per_worker).max(1),
            vip_receive_buffer: args.udp_receive_buffer.unwrap_or(defaults.udp.vip_receive_buffer),
            ..defaults.udp.clone()
        },
        ..defaults
    }
}

/// Publishes every snapshot the source produces to the engine, and remembers that one arrived.
struct EngineSink {
    engine: Arc<Engine>,
    published: Arc<AtomicBool>,
}

impl SnapshotSink for EngineSink {
    fn publish(&self, snapshot: Arc<Snapshot>) {
        self.engine.publish(snapshot);
        self.published.store(true, Ordering::Release);
    }
}

/// What the admin endpoints see of a serving ringlb.
struct ServeState {
    engine: Arc<Engine>,
    published: Arc<AtomicBool>,
    /// Progress of the manifest source; `None` for a fixed snapshot.
    source: Option<Readiness>,
    /// Counters of the active health checks; `None` for a fixed snapshot (nothing is probed).
    health: Option<HealthStatus>,
}

impl AdminState for ServeState {
    fn is_ready(&self) -> bool {
        self.published.load(Ordering::Acquire) && self.engine.is_ready()
    }

    fn status(&self) -> serde_json::Value {
        let snapshot = self.engine.current();
        let source = self.source.as_ref().map(|source| {
            json!({
                "loads": source.loads(),
                "inputs_rejected": source.inputs_rejected(),
                "rejected_reloads": source.rejected_reloads(),
                "rejected_objects": source.rejected_objects(),
            })
        });
        let health = self.health.as_ref().map(|health| {
            json!({
                "probes_sent": health.probes_sent(),
                "probes_failed": health.probes_failed(),
                "probes_local_failures": health.probes_local_failures(),
                "checked_backends": health.checked_backends(),
                "unhealthy_backends": health.unhealthy_backends(),
                "backend_events": health.backend_events(),
                "ejections": health.ejections(),
                "ejected_backends": health.ejected_backends(),
            })
        });
        let workers = self.engine.stats().workers;
        json!({
            "ready": self.is_ready(),
            "snapshot": { "version": snapshot.version, "entries": snapshot.len() },
            "source": source,
            "health": health,
            "workers": workers,
        })
    }
}

pub fn serve(source: Source, engine_args: &EngineArgs, admin_args: &AdminArgs) -> anyhow::Result<ExitCode> {
    let admin_addr = admin::listen_addr(admin_args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ringlb-control")
        .build()
        .context("starting the control runtime")?;
    match lb_datapath::raise_descriptor_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(before, after, "raised the soft descriptor limit to the hard limit")
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the descriptor limit"),
    }
    let engine = Arc::new(
        Engine::start(engine_config(engine_args), Arc::new(Snapshot::empty()))
            .context("starting the datapath")?,
    );
    let (config, budget) = (engine.config(), engine.budget());
    tracing::info!(workers = config.workers, relay = ?engine.relay_mode(), "datapath started");
    tracing::info!(
        limit = budget.limit,
        control_reserve = budget.reserve,
        per_worker = budget.per_worker,
        max_connections_per_worker = config.max_connections_per_worker,
        max_udp_flows_per_worker = config.udp.max_flows_per_worker,
        max_listeners_per_worker = budget.max_listeners(),
        "descriptor budget"
    );
    let published = Arc::new(AtomicBool::new(false));
    let sink = EngineSink { engine: Arc::clone(&engine), published: Arc::clone(&published) };

    let grace = engine_args.shutdown_grace;
    let outcome = runtime.block_on(async {
        let mut signals = Signals::new();
        // Passive outlier detection: the workers' connect outcomes and resets flow back to the
        // control loop's health monitor, whose ejections join the one health overlay.
        let source = match source {
            Source::Manifests(source, control) => match engine.take_backend_events() {
                Some(events) => Source::Manifests(source, control.with_backend_events(events)),
                None => Source::Manifests(source, control),
            },
            fixed => fixed,
        };
        let control = match &source {
            Source::Manifests(_, control) => Some(control),
            Source::Fixed(_) => None,
        };
        if let Some(addr) = admin_addr {
            let listener = admin::bind(addr).await?;
            let state = ServeState {
                engine: Arc::clone(&engine),
                published: Arc::clone(&published),
                source: control.map(ControlLoop::readiness),
                health: control.map(ControlLoop::health_status),
            };
            tracing::info!(%addr, "admin listening (/healthz, /readyz, /status)");
            tokio::spawn(admin::serve(listener, Arc::new(state)));
        }
        let served = match source {
            Source::Manifests(source, control) => {
                control.run(source, sink, signals.next()).await.map_err(anyhow::Error::from)
            }
            Source::Fixed(snapshot) => {
                sink.publish(Arc::new(snapshot));
                signals.next().await;
                Ok(())
            }
        };
        if served.is_ok() {
            drain(&engine, grace, &mut signals).await;
        }
        served
    });
    drop(runtime);
    engine.shutdown();
    tracing::info!("stopped");
    outcome.map(|()| ExitCode::SUCCESS)
}

/// The first half of a graceful shutdown: the listeners close at once, then established
/// connections and flows have up to `grace` to end by themselves (a second signal cuts it short).
async fn drain(engine: &Engine, grace: Duration, signals: &mut Signals) {
    let open = |engine: &Engine| {
        let total = engine.stats().total();
        (total.active, total.flows_active, total.sctp_active)
    };
    if grace.is_zero() {
        let (connections, flows, associations) = open(engine);
        tracing::info!(connections, flows, associations, "shutting down now (--shutdown-grace 0)");
        return;
    }
    engine.begin_drain();
    let (connections, flows, associations) = open(engine);
    tracing::info!(
        ?grace,
        connections,
        flows,
        associations,
        "shutting down: listeners closed, established connections and flows continue"
    );
    let deadline = tokio::time::Instant::now() + grace;
    let mut poll = tokio::time::interval(DRAIN_POLL);
    loop {
        tokio::select! {
            () = signals.next() => {
                tracing::warn!("second signal: closing every connection now");
                return;
            }
            () = tokio::time::sleep_until(deadline) => {
                let (connections, flows, associations) = open(engine);
                tracing::info!(connections, flows, associations, "shutdown grace over; closing what is left");
                return;
            }
            _ = poll.tick() => {
                if engine.is_drained() {
                    tracing::info!("every connection and flow ended");
                    return;
                }
            }
        }
    }
}

/// How often a draining ringlb checks whether everything ended.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// SIGINT (Ctrl-C) and SIGTERM, each delivery one [`Signals::next`].
struct Signals {
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot watch {name}");
                None
            }
        };
        Signals {
            terminate: watch(SignalKind::terminate(), "SIGTERM"),
            interrupt: watch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Resolves at the next SIGINT or SIGTERM.
    async fn next(&mut self) {
        async fn one(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    if signal.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.terminate) => tracing::info!("SIGTERM"),
            () = one(&mut self.interrupt) => tracing::info!("SIGINT"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn engine_args(flags: &[&str]) -> EngineArgs {
        let argv = ["ringlb", "demo"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("valid flags").command {
            Command::Demo(args) => args.engine,
            other => panic!("parsed {other:?}"),
        }
    }

    fn defaults_args(flags: &[&str]) -> DefaultsArgs {
        let argv = ["ringlb", "check", "--manifests", "x.yaml"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("valid flags").command {
            Command::Check(args) => args.defaults,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn udp_flags_reach_the_engine_config_and_defaults_stay_the_engines() {
        let config =
            engine_config(&engine_args(&["--udp-max-flows", "1000", "--udp-receive-buffer", "1048576"]));
        assert_eq!(config.udp.max_flows_per_worker, 1000);
        assert_eq!(config.udp.vip_receive_buffer, 1 << 20);
        assert_eq!(engine_config(&engine_args(&[])).udp, UdpConfig::default());
    }

    #[test]
    fn policy_flags_are_the_defaults_annotations_override() {
        let options = build_options(&defaults_args(&[
            "--udp-unreplied-timeout",
            "5s",
            "--udp-replied-timeout",
            "1m",
            "--udp-stale-flows",
            "drain",
            "--not-ready-connections",
            "keep",
        ]));
        let policy = options.default_policy;
        assert_eq!(policy.udp_unreplied_timeout, Duration::from_secs(5));
        assert_eq!(policy.udp_replied_timeout, Duration::from_secs(60));
        assert_eq!(policy.udp_stale_flows, StaleFlowPolicy::Drain);
        assert_eq!(policy.not_ready_connections, NotReadyConnections::Keep);
        assert_eq!(build_options(&defaults_args(&[])).default_policy, EntryPolicy::default());
    }
}
