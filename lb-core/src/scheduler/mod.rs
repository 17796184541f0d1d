//! Backend selection: a closed set of schedulers behind one enum.
//!
//! A [`Scheduler`] is built once per snapshot from an entry's backends (everything that can be
//! precomputed is: the weighted round-robin sequence, the Maglev table, the hash ring) and then only
//! read. Mutable selection state lives in the datapath worker: a [`PickState`] per entry (cursor,
//! default random stream), so a snapshot swap never invalidates it. The one state shared between
//! workers is each backend's [`BackendLoad`] (an atomic count of its open connections, see `load`),
//! which the least-connection family reads so that it sees every worker's connections.
//!
//! Contract of [`Scheduler::pick_with`] (and of the thin [`Scheduler::pick`]): it returns an index
//! from `eligible` that is not in `exclude`, or `None` only when every eligible backend is excluded
//! or there is none. Callers retry a failed connect by picking again with the failed backend added to
//! `exclude`. Hashing schedulers then move on deterministically (next slot, next ring point), so two
//! instances retry the same way. Never allocates per pick.

mod destination_hash;
mod least_connection;
mod load;
mod maglev;
mod never_queue;
mod power_of_two;
mod ring_hash;
mod round_robin;
mod shortest_expected_delay;
mod source_hash;
mod weighted_least_connection;
mod weighted_round_robin;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::Serialize;

use crate::hash::{SplitMix64, hash_ip, hash_socket_addr, seed};
use crate::model::{Backend, BackendIdx};

pub use destination_hash::DestinationHash;
pub use least_connection::LeastConnection;
pub use load::{BackendLoad, LoadRegistry, Member};
pub use maglev::{DEFAULT_TABLE_SIZE, MAGLEV_VERSION, Maglev, TABLE_SIZES};
pub use never_queue::NeverQueue;
pub use power_of_two::{PowerOfTwoChoices, two_choices};
pub use ring_hash::{MAX_POINTS, POINTS_PER_WEIGHT, RingHash};
pub use round_robin::RoundRobin;
pub use shortest_expected_delay::ShortestExpectedDelay;
pub use source_hash::SourceHash;
pub use weighted_least_connection::WeightedLeastConnection;
pub use weighted_round_robin::{MAX_SEQUENCE_LEN, WeightedRoundRobin};

/// Which scheduler a service uses, as named in the `ringlb.io/scheduler` annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    /// `rr`: each eligible backend in turn.
    #[default]
    RoundRobin,
    /// `wrr`: each eligible backend in proportion to its weight, interleaved.
    WeightedRoundRobin,
    /// `lc`: fewest active connections (every worker's, see [`BackendLoad`]).
    LeastConnection,
    /// `wlc`: fewest active connections per unit of weight.
    WeightedLeastConnection,
    /// `sed`: shortest expected delay, `(active + 1) / weight`.
    ShortestExpectedDelay,
    /// `nq`: an idle backend if there is one, else as `sed`.
    NeverQueue,
    /// `dh`: hash of the destination the client addressed (the VIP and port), so one entry's new
    /// connections all go to one backend, the next one in hash order when it fails.
    DestinationHash,
    /// `sh`: hash of the client address (IP, or IP and port with `ringlb.io/hash-key: ip-port`).
    SourceHash,
    /// `maglev`: Maglev lookup table over the client hash; minimal disruption, same on every instance.
    Maglev,
    /// `p2c`: two random eligible backends, the less loaded (per weight) of them.
    PowerOfTwoChoices,
    /// `ring-hash`: consistent hash ring with virtual nodes over the client hash.
    RingHash,
}

impl SchedulerKind {
    pub const ALL: &'static [SchedulerKind] = &[
        SchedulerKind::RoundRobin,
        SchedulerKind::WeightedRoundRobin,
        SchedulerKind::LeastConnection,
        SchedulerKind::WeightedLeastConnection,
        SchedulerKind::ShortestExpectedDelay,
        SchedulerKind::NeverQueue,
        SchedulerKind::DestinationHash,
        SchedulerKind::SourceHash,
        SchedulerKind::Maglev,
        SchedulerKind::PowerOfTwoChoices,
        SchedulerKind::RingHash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::RoundRobin => "rr",
            SchedulerKind::WeightedRoundRobin => "wrr",
            SchedulerKind::LeastConnection => "lc",
            SchedulerKind::WeightedLeastConnection => "wlc",
            SchedulerKind::ShortestExpectedDelay => "sed",
            SchedulerKind::NeverQueue => "nq",
            SchedulerKind::DestinationHash => "dh",
            SchedulerKind::SourceHash => "sh",
            SchedulerKind::Maglev => "maglev",
            SchedulerKind::PowerOfTwoChoices => "p2c",
            SchedulerKind::RingHash => "ring-hash",
        }
    }

    /// Whether picks hash the client's address ([`PickContext::client`]); the others never read it.
    pub fn uses_client(self) -> bool {
        matches!(self, SchedulerKind::SourceHash | SchedulerKind::Maglev | SchedulerKind::RingHash)
    }

    /// Whether picks depend on the backends' [`BackendLoad`].
    pub fn uses_load(self) -> bool {
        matches!(
            self,
            SchedulerKind::LeastConnection
                | SchedulerKind::WeightedLeastConnection
                | SchedulerKind::ShortestExpectedDelay
                | SchedulerKind::NeverQueue
                | SchedulerKind::PowerOfTwoChoices
        )
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not one of [`SchedulerKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?} (known: rr, wrr, lc, wlc, sed, nq, dh, sh, maglev, p2c, ring-hash)")]
pub struct UnknownScheduler(pub String);

impl FromStr for SchedulerKind {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchedulerKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| UnknownScheduler(s.to_owned()))
    }
}

/// What the hashing schedulers (`sh`, `dh`, `maglev`, `ring-hash`) hash: `ringlb.io/hash-key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashKey {
    /// `ip`: the IP only, so every connection of one client lands on one backend.
    #[default]
    Ip,
    /// `ip-port`: IP and port, spreading one client's connections (no stickiness).
    IpPort,
}

impl HashKey {
    pub fn hash(self, addr: SocketAddr) -> u64 {
        match self {
            HashKey::Ip => hash_ip(addr.ip(), seed::LOOKUP),
            HashKey::IpPort => hash_socket_addr(addr, seed::LOOKUP),
        }
    }
}

impl FromStr for HashKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ip" => Ok(HashKey::Ip),
            "ip-port" => Ok(HashKey::IpPort),
            other => Err(format!("unknown hash key {other:?} (known: ip, ip-port)")),
        }
    }
}

/// Everything a scheduler is built from besides the backends: the annotations' choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SchedulerConfig {
    pub kind: SchedulerKind,
    pub hash_key: HashKey,
    /// Maglev lookup table size; a prime (see [`TABLE_SIZES`]).
    pub maglev_table_size: u32,
}

impl SchedulerConfig {
    pub fn new(kind: SchedulerKind) -> Self {
        SchedulerConfig { kind, hash_key: HashKey::default(), maglev_table_size: DEFAULT_TABLE_SIZE }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig::new(SchedulerKind::default())
    }
}

/// What the datapath knows about a new connection or flow when it asks for a backend (the original,
/// minimal request; see [`PickContext`] for everything the richer schedulers use).
#[derive(Debug, Clone, Copy)]
pub struct PickRequest<'a> {
    /// The client's address (for hashing schedulers and affinity).
    pub client: SocketAddr,
    /// Backends already tried for this connection; never returned again.
    pub exclude: &'a [BackendIdx],
}

/// Everything a pick may use. Build one per pick on the stack; it borrows, never allocates.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The client's address (`sh`, `maglev`, `ring-hash`).
    pub client: SocketAddr,
    /// The address the client connected to, normally the VIP and port (`dh`). `None` hashes nothing
    /// (a constant), which for one entry behaves the same as hashing its fixed VIP.
    pub destination: Option<SocketAddr>,
    /// Backends already tried for this connection; never returned again.
    pub exclude: &'a [BackendIdx],
    /// A fresh random value for this pick (`p2c`), from the worker's own generator.
    pub random: u64,
}

impl<'a> PickContext<'a> {
    /// A context with no destination and `random` 0: what [`Scheduler::pick`] starts from.
    pub fn new(client: SocketAddr, exclude: &'a [BackendIdx]) -> Self {
        PickContext { client, destination: None, exclude, random: 0 }
    }

    pub(crate) fn excluded(&self, idx: BackendIdx) -> bool {
        self.exclude.contains(&idx)
    }

    /// `member`'s active connections (every worker's).
    pub(crate) fn active(&self, member: &Member) -> u64 {
        u64::from(member.load.active())
    }
}

/// Per-worker, per-entry mutable selection state. Owned by one worker; never shared.
#[derive(Debug, Clone, Default)]
pub struct PickState {
    pub(crate) cursor: u64,
    /// Default random stream of [`Scheduler::pick`] (which has no random input of its own).
    pub(crate) random: SplitMix64,
}

impl PickState {
    /// A state whose cursor starts at `cursor` (taken modulo each sequence's length) and whose default
    /// random stream starts from `seed`. Workers start at different cursors (their index) so that W
    /// workers do not all send their first connection of a Service to the same backend.
    pub fn seeded(cursor: u64, seed: u64) -> Self {
        PickState { cursor, random: SplitMix64(seed) }
    }
}

/// A scheduler with its per-snapshot precomputed data. Cloning shares the large tables (`Arc`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Scheduler {
    RoundRobin(RoundRobin),
    WeightedRoundRobin(WeightedRoundRobin),
    LeastConnection(LeastConnection),
    WeightedLeastConnection(WeightedLeastConnection),
    ShortestExpectedDelay(ShortestExpectedDelay),
    NeverQueue(NeverQueue),
    DestinationHash(DestinationHash),
    SourceHash(SourceHash),
    Maglev(Maglev),
    PowerOfTwoChoices(PowerOfTwoChoices),
    RingHash(RingHash),
}

impl Scheduler {
    /// Precomputes a scheduler of `kind` (defaults for everything else) over `eligible` indices into
    /// `backends`.
    pub fn build(kind: SchedulerKind, backends: &[Backend], eligible: &[BackendIdx]) -> Scheduler {
        Scheduler::build_with(&SchedulerConfig::new(kind), backends, eligible)
    }

    /// Precomputes the scheduler `config` describes over `eligible` indices into `backends`.
    pub fn build_with(config: &SchedulerConfig, backends: &[Backend], eligible: &[BackendIdx]) -> Scheduler {
        let members = || Member::collect(backends, eligible);
        match config.kind {
            SchedulerKind::RoundRobin => Scheduler::RoundRobin(RoundRobin::build(eligible)),
            SchedulerKind::WeightedRoundRobin => {
                Scheduler::WeightedRoundRobin(WeightedRoundRobin::build(backends, eligible))
            }
            SchedulerKind::LeastConnection => Scheduler::LeastConnection(LeastConnection::build(members())),
            SchedulerKind::WeightedLeastConnection => {
                Scheduler::WeightedLeastConnection(WeightedLeastConnection::build(members()))
            }
            SchedulerKind::ShortestExpectedDelay => {
                Scheduler::ShortestExpectedDelay(ShortestExpectedDelay::build(members()))
            }
            SchedulerKind::NeverQueue => Scheduler::NeverQueue(NeverQueue::build(members())),
            SchedulerKind::DestinationHash => {
                Scheduler::DestinationHash(DestinationHash::build(backends, eligible, config.hash_key))
            }
            SchedulerKind::SourceHash => {
                Scheduler::SourceHash(SourceHash::build(backends, eligible, config.hash_key))
            }
            SchedulerKind::Maglev => Scheduler::Maglev(Maglev::build(
                backends,
                eligible,
                config.maglev_table_size,
                config.hash_key,
            )),
            SchedulerKind::PowerOfTwoChoices => {
                Scheduler::PowerOfTwoChoices(PowerOfTwoChoices::build(members()))
            }
            SchedulerKind::RingHash => {
                Scheduler::RingHash(RingHash::build(backends, eligible, config.hash_key))
            }
        }
    }

    pub fn kind(&self) -> SchedulerKind {
        match self {
            Scheduler::RoundRobin(_) => SchedulerKind::RoundRobin,
            Scheduler::WeightedRoundRobin(_) => SchedulerKind::WeightedRoundRobin,
            Scheduler::LeastConnection(_) => SchedulerKind::LeastConnection,
            Scheduler::WeightedLeastConnection(_) => SchedulerKind::WeightedLeastConnection,
            Scheduler::ShortestExpectedDelay(_) => SchedulerKind::ShortestExpectedDelay,
            Scheduler::NeverQueue(_) => SchedulerKind::NeverQueue,
            Scheduler::DestinationHash(_) => SchedulerKind::DestinationHash,
            Scheduler::SourceHash(_) => SchedulerKind::SourceHash,
            Scheduler::Maglev(_) => SchedulerKind::Maglev,
            Scheduler::PowerOfTwoChoices(_) => SchedulerKind::PowerOfTwoChoices,
            Scheduler::RingHash(_) => SchedulerKind::RingHash,
        }
    }

    /// The configuration this scheduler was built from (to rebuild it over other backends).
    pub fn config(&self) -> SchedulerConfig {
        let mut config = SchedulerConfig::new(self.kind());
        match self {
            Scheduler::Maglev(s) => {
                config.hash_key = s.hash_key;
                config.maglev_table_size = s.table_size;
            }
            Scheduler::SourceHash(s) => config.hash_key = s.hash_key,
            Scheduler::DestinationHash(s) => config.hash_key = s.hash_key,
            Scheduler::RingHash(s) => config.hash_key = s.hash_key,
            _ => {}
        }
        config
    }

    /// Picks a backend for a new connection with everything the datapath knows; see the module doc.
    pub fn pick_with(&self, context: &PickContext<'_>, state: &mut PickState) -> Option<BackendIdx> {
        match self {
            Scheduler::RoundRobin(s) => s.pick(context, state),
            Scheduler::WeightedRoundRobin(s) => s.pick(context, state),
            Scheduler::LeastConnection(s) => s.pick(context, state),
            Scheduler::WeightedLeastConnection(s) => s.pick(context, state),
            Scheduler::ShortestExpectedDelay(s) => s.pick(context, state),
            Scheduler::NeverQueue(s) => s.pick(context, state),
            Scheduler::DestinationHash(s) => s.pick(context),
            Scheduler::SourceHash(s) => s.pick(context),
            Scheduler::Maglev(s) => s.pick(context),
            Scheduler::PowerOfTwoChoices(s) => s.pick(context),
            Scheduler::RingHash(s) => s.pick(context),
        }
    }

    /// Picks with only a client and exclusions: no destination and a random value from `state`'s own
    /// deterministic stream. Kept for callers that have nothing more.
    pub fn pick(&self, request: &PickRequest<'_>, state: &mut PickState) -> Option<BackendIdx> {
        let random = state.random.next_u64();
        let context = PickContext { random, ..PickContext::new(request.client, request.exclude) };
        self.pick_with(&context, state)
    }
}

/// Walks `sequence` from the state's cursor and returns the first index not excluded, advancing the
/// cursor past it. Shared by the sequence-based schedulers (rr, wrr).
pub(crate) fn next_in_sequence(
    sequence: &[BackendIdx],
    context: &PickContext<'_>,
    state: &mut PickState,
) -> Option<BackendIdx> {
    let len = sequence.len() as u64;
    if len == 0 {
        return None;
    }
    for step in 0..len {
        let position = (state.cursor.wrapping_add(step)) % len;
        let candidate = sequence[position as usize];
        if !context.excluded(candidate) {
            state.cursor = position + 1;
            return Some(candidate);
        }
    }
    None
}

/// From slot `start` of a lookup `table` (Maglev, sh/dh sequence), the first backend not excluded,
/// walking forward; `None` at once when every one of `eligible` is excluded, so a full exclusion
/// never scans the whole table.
pub(crate) fn walk_table(
    table: &[BackendIdx],
    eligible: &[BackendIdx],
    start: usize,
    context: &PickContext<'_>,
) -> Option<BackendIdx> {
    if table.is_empty() || eligible.iter().all(|&idx| context.excluded(idx)) {
        return None;
    }
    (0..table.len()).map(|step| table[(start + step) % table.len()]).find(|&idx| !context.excluded(idx))
}
