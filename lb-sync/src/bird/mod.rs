//! BGP mode: the advertised VIPs (see [`lb_core::advertised_vips`]) as /32 and /128 routes of BIRD 2,
//! the routing daemon that speaks BGP (and BFD) to the network for this node.
//!
//! ringlb owns one file, the include file (`--bird-include`): two static protocols,
//! [`PROTOCOL_V4`] and [`PROTOCOL_V6`], with one route per VIP: `unreachable`, or through the
//! liveness link (`--bird-liveness-link`, see [`crate::liveness_link`]) so that the routes of a ringlb
//! that died without withdrawing them go with it. The operator's `bird.conf` includes the file and
//! exports those protocols to its BGP peers (see `deploy/bird/`); BIRD sets itself as the next hop,
//! and routes that leave the file are withdrawn. After each change ringlb asks BIRD to reread its
//! configuration through the control socket (`birdc -s SOCKET configure`), which changes only the
//! static routes and keeps every BGP session up.
//!
//! Invariants:
//! - the file is replaced atomically (a temporary sibling renamed over it), so BIRD never reads half of
//!   it, also when it restarts on its own;
//! - BIRD is asked only when the set differs from the one it last accepted; a failed write or
//!   reconfiguration is logged (the same failure at most every [`LOG_EVERY`]) and retried after
//!   [`RETRY_AFTER`] until it succeeds;
//! - the first set written is the one of the snapshot at start (empty until a table is served), so
//!   routes a crashed predecessor left are withdrawn; on [`run`]'s stop the empty set is written (the
//!   sessions of a plan kept), which
//!   withdraws every route.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::follow::{Apply, follow};
#[cfg(doc)]
use crate::follow::{LOG_EVERY, RETRY_AFTER};
use crate::liveness_link::LivenessLink;

mod cluster;
pub mod peers;

use lb_core::Cidr;
use lb_core::announcement::BgpPlan;
pub use peers::{BgpPeer, Peering};

/// The static protocol of the IPv4 VIPs in the include file.
pub const PROTOCOL_V4: &str = "ringlb_vips4";
/// The static protocol of the IPv6 VIPs in the include file.
pub const PROTOCOL_V6: &str = "ringlb_vips6";

/// Where BIRD's control socket is by default (Debian's `bird2` package).
pub const DEFAULT_SOCKET: &str = "/run/bird/bird.ctl";

/// How long `birdc configure` may take before it counts as failed (and is killed).
const BIRDC_TIMEOUT: Duration = Duration::from_secs(5);

/// Where ringlb writes its routes and how it reaches BIRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BirdConfig {
    /// The include file ringlb owns (`--bird-include`).
    pub include: PathBuf,
    /// BIRD's control socket (`--bird-socket`).
    pub socket: PathBuf,
    /// The `birdc` program (`--birdc`): a name looked up in `PATH`, or a path.
    pub birdc: PathBuf,
    /// BGP sessions ringlb renders itself (`--bgp-asn`, `--bgp-peer`; see [`peers`]); `None` when
    /// `bird.conf` has them.
    pub peering: Option<Peering>,
}

#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error("cannot write the BIRD include file {}: {error}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("cannot run {} (for BIRD's control socket {}): {error}", program.display(), socket.display())]
    Spawn {
        program: PathBuf,
        socket: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("`{} -s {} configure` did not finish within {timeout:?}", program.display(), socket.display())]
    Timeout { program: PathBuf, socket: PathBuf, timeout: Duration },
    #[error("`{} -s {} configure` failed ({status}): {output}", program.display(), socket.display())]
    Refused { program: PathBuf, socket: PathBuf, status: std::process::ExitStatus, output: String },
}

/// The include file for `advertised`: both static protocols, always present (an empty protocol is
/// valid), so the operator's export filters never name a protocol that does not exist. With a
/// liveness link (see [`crate::liveness_link`]) each route goes through it, and lives only while it
/// is up. With a `peering`, the BGP sessions follow (see [`peers`]); with a plan, its sessions.
///
/// ```
/// use lb_sync::bird::{Advertised, render};
/// let vips = Advertised::vips(&["192.0.2.7".parse().unwrap()].into());
/// assert!(render(&vips, None, None).contains("route 192.0.2.7/32 unreachable;"));
/// let live = render(&vips, Some("ringlb-live"), None);
/// assert!(live.contains("route 192.0.2.7/32 via \"ringlb-live\";"));
/// ```
pub fn render(advertised: &Advertised, liveness_link: Option<&str>, peering: Option<&Peering>) -> String {
    let mut text = String::from(
        "# Written by ringlb (--bird-include): the VIPs this node advertises. Do not edit: ringlb\n\
         # replaces this file whenever they change, then runs `birdc configure`.\n",
    );
    for (protocol, channel, v4) in [(PROTOCOL_V4, "ipv4", true), (PROTOCOL_V6, "ipv6", false)] {
        let _ = writeln!(text, "protocol static {protocol} {{\n  {channel};");
        if liveness_link.is_some() {
            text.push_str("  check link;\n");
        }
        for prefix in advertised.prefixes.iter().filter(|prefix| prefix.network().is_ipv4() == v4) {
            match liveness_link {
                Some(link) => _ = writeln!(text, "  route {prefix} via \"{link}\";"),
                None => _ = writeln!(text, "  route {prefix} unreachable;"),
            }
        }
        text.push_str("}\n");
    }
    if let Some(peering) = peering {
        peers::render(peering, &mut text);
    }
    if let Some(plan) = &advertised.plan {
        cluster::render(plan, &mut text);
    }
    text
}

/// What BIRD is to announce: the prefixes of ringlb's static protocols and, with BGP from the
/// cluster, the sessions that export them (see [`cluster`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertised {
    pub prefixes: BTreeSet<Cidr>,
    /// `None`: the sessions are `--bgp-peer`'s or `bird.conf`'s, and take every prefix.
    pub plan: Option<BgpPlan>,
}

impl Advertised {
    /// A host route (/32, /128) for each of `vips`.
    pub fn vips(vips: &BTreeSet<IpAddr>) -> Advertised {
        let host = |vip: &IpAddr| Cidr::new(*vip, if vip.is_ipv4() { 32 } else { 128 }).ok();
        Advertised { prefixes: vips.iter().filter_map(host).collect(), plan: None }
    }

    /// The sessions and routes of `plan`.
    pub fn plan(plan: BgpPlan) -> Advertised {
        Advertised { prefixes: plan.prefixes(), plan: Some(plan) }
    }

    /// Nothing: every route withdrawn, every session of a plan kept (a withdrawal, not a session
    /// loss, tells the peers at once).
    fn withdrawn(&self) -> Advertised {
        let plan = self.plan.as_ref().map(|plan| BgpPlan {
            sessions: plan
                .sessions
                .iter()
                .map(|s| lb_core::announcement::bgp::SessionRoutes {
                    session: s.session.clone(),
                    routes: Default::default(),
                })
                .collect(),
        });
        Advertised { prefixes: BTreeSet::new(), plan }
    }
}

/// What [`run`] has done, for the admin endpoint (`/status` → `bgp`); clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct BirdStatus(Arc<BirdCounters>);

#[derive(Debug, Default)]
struct BirdCounters {
    routes: AtomicU64,
    reconfigurations: AtomicU64,
    failures: AtomicU64,
    failing: AtomicBool,
}

impl BirdStatus {
    /// The routes of the set BIRD last accepted.
    pub fn routes(&self) -> u64 {
        self.0.routes.load(Ordering::Relaxed)
    }

    /// Changes BIRD accepted (file written, `birdc configure` succeeded).
    pub fn reconfigurations(&self) -> u64 {
        self.0.reconfigurations.load(Ordering::Relaxed)
    }

    /// Attempts that failed (each retried).
    pub fn failures(&self) -> u64 {
        self.0.failures.load(Ordering::Relaxed)
    }

    /// Whether the last attempt failed: BIRD's routes may differ from the served table.
    pub fn failing(&self) -> bool {
        self.0.failing.load(Ordering::Relaxed)
    }

    /// One attempt: the routes BIRD accepted, or `None` when it failed.
    fn record(&self, accepted: Option<usize>) {
        let counters = &self.0;
        match accepted {
            Some(routes) => {
                counters.routes.store(routes as u64, Ordering::Relaxed);
                counters.reconfigurations.fetch_add(1, Ordering::Relaxed);
            }
            None => _ = counters.failures.fetch_add(1, Ordering::Relaxed),
        }
        counters.failing.store(accepted.is_none(), Ordering::Relaxed);
    }
}

/// Writes the include file and has BIRD reread its configuration.
#[derive(Debug)]
pub struct Bird {
    config: BirdConfig,
    /// Dropped (the interface deleted) only after the routes were withdrawn, or with the process.
    liveness_link: Option<LivenessLink>,
    status: BirdStatus,
}

impl Bird {
    pub fn new(config: BirdConfig) -> Bird {
        Bird { config, liveness_link: None, status: BirdStatus::default() }
    }

    /// Reports to `status` (e.g. one the admin endpoint already shows) from now on.
    pub fn with_status(self, status: BirdStatus) -> Bird {
        Bird { status, ..self }
    }

    pub fn status(&self) -> &BirdStatus {
        &self.status
    }

    /// Routes through `link` from now on: BIRD drops them when the link goes with this process.
    pub fn with_liveness_link(self, link: LivenessLink) -> Bird {
        Bird { liveness_link: Some(link), ..self }
    }

    pub fn config(&self) -> &BirdConfig {
        &self.config
    }

    /// Makes `advertised` BIRD's routes: writes the include file, then `birdc configure`.
    pub async fn apply(&self, advertised: &Advertised) -> Result<(), BirdError> {
        let link = self.liveness_link.as_ref().map(LivenessLink::name);
        let text = render(advertised, link, self.config.peering.as_ref());
        write_atomically(&self.config.include, &text)
            .map_err(|error| BirdError::Write { path: self.config.include.clone(), error })?;
        self.reconfigure().await
    }

    async fn reconfigure(&self) -> Result<(), BirdError> {
        let BirdConfig { socket, birdc: program, .. } = &self.config;
        let mut command = tokio::process::Command::new(program);
        command.arg("-s").arg(socket).arg("configure");
        command.stdin(std::process::Stdio::null()).kill_on_drop(true);
        let spawn = |error| BirdError::Spawn { program: program.clone(), socket: socket.clone(), error };
        let output = match tokio::time::timeout(BIRDC_TIMEOUT, command.output()).await {
            Ok(output) => output.map_err(spawn)?,
            Err(_) => {
                let (program, socket) = (program.clone(), socket.clone());
                return Err(BirdError::Timeout { program, socket, timeout: BIRDC_TIMEOUT });
            }
        };
        if output.status.success() {
            return Ok(());
        }
        let said = [&output.stdout, &output.stderr].map(|bytes| String::from_utf8_lossy(bytes).into_owned());
        // birdc prints its banner first; what follows says what went wrong.
        let said = said.join("\n");
        let lines: Vec<&str> = said
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with("BIRD "))
            .collect();
        Err(BirdError::Refused {
            program: program.clone(),
            socket: socket.clone(),
            status: output.status,
            output: lines.join("; "),
        })
    }
}

/// Writes `text` to a temporary sibling of `path` and renames it over `path`.
fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::other("the path names no file"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .inspect_err(|_| drop(std::fs::remove_file(&temporary)))
}

/// BIRD's routes as [`run`] keeps them, with whether BIRD has accepted them once (logged once).
struct Routes<'a> {
    bird: &'a Bird,
    accepted: bool,
    /// The last target asked for, whose sessions stay when the routes are withdrawn.
    last: Option<Advertised>,
}

impl Apply<Advertised> for Routes<'_> {
    type Error = BirdError;

    async fn apply(&mut self, target: &Advertised) -> Result<(), BirdError> {
        let outcome = self.bird.apply(target).await;
        let routes = target.prefixes.len();
        self.bird.status.record(outcome.is_ok().then_some(routes));
        if outcome.is_ok() {
            let include = self.bird.config().include.display();
            tracing::debug!(%include, routes, "BIRD routes updated");
            if !std::mem::replace(&mut self.accepted, true) {
                tracing::info!(%include, routes, "BIRD accepted ringlb's routes");
            }
        }
        self.last = Some(target.clone());
        outcome
    }
}

/// Keeps BIRD's routes equal to `advertised` of what `wanted` holds (e.g. the host routes of
/// [`lb_core::advertised_vips`] of the published snapshot) until `stop` resolves, then withdraws
/// them all (see the module doc). The sender gone (the control loop ended), the routes stay until
/// `stop`.
pub async fn run<T>(
    bird: Bird,
    wanted: watch::Receiver<T>,
    advertised: impl Fn(&T) -> Advertised,
    stop: impl Future,
) {
    let mut routes = Routes { bird: &bird, accepted: false, last: None };
    follow(wanted, advertised, &mut routes, "cannot update BIRD's routes", stop).await;
    let withdrawn = routes.last.as_ref().map(Advertised::withdrawn).unwrap_or_default();
    let withdrawn = bird.apply(&withdrawn).await;
    bird.status.record(withdrawn.is_ok().then_some(0));
    match withdrawn {
        Ok(()) => tracing::info!(include = %bird.config().include.display(), "BIRD routes withdrawn"),
        Err(error) => tracing::warn!(%error, "cannot withdraw BIRD's routes"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn vips(addresses: &[&str]) -> Advertised {
        Advertised::vips(&addresses.iter().map(|a| a.parse().expect("an address")).collect())
    }

    /// A stand-in for `birdc` that appends its arguments to `calls` and exits with `status`.
    fn fake_birdc(dir: &Path, status: i32) -> PathBuf {
        let program = dir.join("birdc");
        let calls = dir.join("calls");
        let script = format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\necho 'BIRD 2.0.12 ready.'\n[ {status} -eq 0 ] || echo 'ringlb.conf:3:1 syntax error'\nexit {status}\n",
            calls.display()
        );
        std::fs::write(&program, script).expect("write the fake birdc");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        program
    }

    fn calls(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("calls")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    fn bird(dir: &Path, birdc: PathBuf) -> Bird {
        let (include, socket) = (dir.join("ringlb.conf"), dir.join("bird.ctl"));
        Bird::new(BirdConfig { include, socket, birdc, peering: None })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
    }

    #[test]
    fn the_include_file_holds_one_unreachable_route_per_vip_in_its_familys_protocol() {
        let text = render(&vips(&["192.0.2.7", "2001:db8::5", "192.0.2.1"]), None, None);
        let body: Vec<&str> = text.lines().filter(|line| !line.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "protocol static ringlb_vips4 {",
                "  ipv4;",
                "  route 192.0.2.1/32 unreachable;",
                "  route 192.0.2.7/32 unreachable;",
                "}",
                "protocol static ringlb_vips6 {",
                "  ipv6;",
                "  route 2001:db8::5/128 unreachable;",
                "}",
            ]
        );
        let empty = render(&Advertised::default(), None, None);
        assert!(empty.contains("protocol static ringlb_vips4 {\n  ipv4;\n}"), "{empty}");
        assert!(empty.contains("protocol static ringlb_vips6 {\n  ipv6;\n}"), "{empty}");
    }

    #[test]
    fn with_a_liveness_link_every_route_goes_through_it_and_follows_its_link_state() {
        let text = render(&vips(&["192.0.2.7", "2001:db8::5"]), Some("ringlb-live"), None);
        let body: Vec<&str> = text.lines().filter(|line| !line.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "protocol static ringlb_vips4 {",
                "  ipv4;",
                "  check link;",
                "  route 192.0.2.7/32 via \"ringlb-live\";",
                "}",
                "protocol static ringlb_vips6 {",
                "  ipv6;",
                "  check link;",
                "  route 2001:db8::5/128 via \"ringlb-live\";",
                "}",
            ]
        );
    }

    #[test]
    fn apply_replaces_the_file_and_asks_bird_to_reconfigure_through_its_socket() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let bird = bird(dir.path(), fake_birdc(dir.path(), 0));
        std::fs::write(dir.path().join("ringlb.conf"), "old").expect("write");
        runtime().block_on(bird.apply(&vips(&["192.0.2.7"]))).expect("applied");
        let written = std::fs::read_to_string(dir.path().join("ringlb.conf")).expect("read");
        assert_eq!(written, render(&vips(&["192.0.2.7"]), None, None));
        let socket = dir.path().join("bird.ctl");
        assert_eq!(calls(dir.path()), [format!("-s {} configure", socket.display())]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary file stays: {leftovers:?}");
    }

    #[test]
    fn every_failure_is_an_error_naming_what_failed_never_a_panic() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let runtime = runtime();
        let refused =
            runtime.block_on(bird(dir.path(), fake_birdc(dir.path(), 1)).apply(&Advertised::default()));
        let message = refused.expect_err("birdc failed").to_string();
        assert!(message.contains("configure` failed") && message.contains("syntax error"), "{message}");
        assert!(!message.contains("BIRD 2.0.12"), "the banner is left out: {message}");

        let missing = bird(dir.path(), dir.path().join("no-such-birdc"));
        let message =
            runtime.block_on(missing.apply(&Advertised::default())).expect_err("no birdc").to_string();
        assert!(message.contains("cannot run") && message.contains("no-such-birdc"), "{message}");

        let mut unwritable = bird(dir.path(), fake_birdc(dir.path(), 0));
        unwritable.config.include = dir.path().join("no-such-dir").join("ringlb.conf");
        let message =
            runtime.block_on(unwritable.apply(&Advertised::default())).expect_err("no dir").to_string();
        assert!(message.contains("cannot write the BIRD include file"), "{message}");
    }

    #[test]
    fn run_follows_the_wanted_set_retries_failures_and_withdraws_everything_at_stop() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let include = dir.path().join("ringlb.conf");
        // A birdc that fails until the file `healthy` exists.
        let failing = fake_birdc(dir.path(), 1);
        let healthy = dir.path().join("healthy");
        let script = std::fs::read_to_string(&failing)
            .expect("read")
            .replace("exit 1", &format!("[ -e '{}' ]", healthy.display()));
        std::fs::write(&failing, script).expect("write");
        let bird = bird(dir.path(), failing);
        let status = bird.status().clone();
        let (wanted, receiver) = watch::channel(vips(&["192.0.2.1"]));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let calls = || calls(dir.path());
        let written = || std::fs::read_to_string(&include).unwrap_or_default();
        runtime().block_on(async {
            let task = tokio::spawn(run(bird, receiver, Advertised::clone, stopped));
            until("a first, failing attempt", || status.failing()).await;
            assert!(written().contains("192.0.2.1/32"));
            assert_eq!((status.routes(), status.reconfigurations()), (0, 0));
            std::fs::write(&healthy, "").expect("heal birdc");
            until("the retry", || !status.failing()).await;
            assert_eq!((status.routes(), status.reconfigurations(), status.failures()), (1, 1, 1));
            let settled = calls().len();
            wanted.send_replace(vips(&["192.0.2.1"]));
            wanted.send_replace(vips(&["192.0.2.2"]));
            until("the new set and its reconfiguration", || {
                written().contains("192.0.2.2/32") && calls().len() > settled
            })
            .await;
            drop(wanted);
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(10), task).await.expect("run ends").expect("no panic");
        });
        let text = std::fs::read_to_string(&include).expect("read");
        assert_eq!(text, render(&Advertised::default(), None, None), "everything withdrawn at stop");
        assert_eq!((status.routes(), status.reconfigurations(), status.failing()), (0, 3, false));
    }

    /// Polls `done` every 10 ms; panics naming `what` after 10 s.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
