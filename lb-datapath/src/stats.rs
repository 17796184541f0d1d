//! Per-worker counters, written only by their worker and read by anyone through [`EngineStats`].
//!
//! Counters are relaxed atomics on a cache-line-aligned block per worker, so the hot path never
//! shares a line with another worker and never takes a lock. Readers get a consistent-enough view
//! (each counter is exact; different counters may be a few events apart).

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one worker.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct WorkerCounters {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub connect_failures: AtomicU64,
    pub retries: AtomicU64,
    pub source_port_collisions: AtomicU64,
    pub no_backend: AtomicU64,
    pub resets: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub drain_closes: AtomicU64,
    pub draining: AtomicU64,
    pub backend_events_dropped: AtomicU64,
    pub bytes_client_to_backend: AtomicU64,
    pub bytes_backend_to_client: AtomicU64,
    pub listeners: AtomicU64,
    pub bind_failures: AtomicU64,
    pub buffers_in_use: AtomicU64,
    pub pipes_in_use: AtomicU64,
    pub pipes_idle: AtomicU64,
    pub relay_spliced: AtomicU64,
    pub relay_unspliced: AtomicU64,
    pub relay_buffers_exhausted: AtomicU64,
    pub udp_listeners: AtomicU64,
    pub flows_active: AtomicU64,
    pub flows_created: AtomicU64,
    pub flows_expired: AtomicU64,
    pub flows_evicted: AtomicU64,
    pub flows_moved: AtomicU64,
    pub flows_failed: AtomicU64,
    pub udp_datagrams_client_to_backend: AtomicU64,
    pub udp_bytes_client_to_backend: AtomicU64,
    pub udp_datagrams_backend_to_client: AtomicU64,
    pub udp_sends: AtomicU64,
    pub udp_bytes_backend_to_client: AtomicU64,
    pub udp_drops_truncated: AtomicU64,
    pub udp_drops_no_backend: AtomicU64,
    pub udp_drops_send: AtomicU64,
    pub udp_drops_source_range: AtomicU64,
    pub udp_drops_not_a_vip: AtomicU64,
    pub udp_recv_rearms: AtomicU64,
    pub tcp_refused_source_range: AtomicU64,
    pub tcp_refused_not_a_vip: AtomicU64,
    pub backend_load: AtomicU64,
    pub sctp_listeners: AtomicU64,
    pub sctp_active: AtomicU64,
    pub sctp_accepted: AtomicU64,
    pub sctp_messages_client_to_backend: AtomicU64,
    pub sctp_messages_backend_to_client: AtomicU64,
    pub sctp_aborts: AtomicU64,
    pub sctp_too_large: AtomicU64,
    pub local_no_source_port: AtomicU64,
    pub local_no_descriptors: AtomicU64,
    pub local_no_memory: AtomicU64,
    pub local_transparent_failed: AtomicU64,
    pub budget_refusals: AtomicU64,
    pub descriptors: AtomicU64,
    pub descriptor_budget: AtomicU64,
    pub ring_completion_entries: AtomicU64,
    pub ring_cq_overflowed: AtomicU64,
    pub ring_cq_dropped: AtomicU64,
    pub ring_submit_retries: AtomicU64,
    pub ring_failed: AtomicU64,
}

/// Adds `n` to a counter owned by the calling worker.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Sets a gauge owned by the calling worker.
pub(crate) fn set(counter: &AtomicU64, n: u64) {
    counter.store(n, Ordering::Relaxed);
}

impl WorkerCounters {
    pub fn read(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerStats {
            accepted: get(&self.accepted),
            active: get(&self.active),
            connect_failures: get(&self.connect_failures),
            retries: get(&self.retries),
            source_port_collisions: get(&self.source_port_collisions),
            no_backend: get(&self.no_backend),
            resets: get(&self.resets),
            idle_timeouts: get(&self.idle_timeouts),
            drain_closes: get(&self.drain_closes),
            draining: get(&self.draining),
            backend_events_dropped: get(&self.backend_events_dropped),
            bytes_client_to_backend: get(&self.bytes_client_to_backend),
            bytes_backend_to_client: get(&self.bytes_backend_to_client),
            listeners: get(&self.listeners),
            bind_failures: get(&self.bind_failures),
            buffers_in_use: get(&self.buffers_in_use),
            pipes_in_use: get(&self.pipes_in_use),
            pipes_idle: get(&self.pipes_idle),
            relay_spliced: get(&self.relay_spliced),
            relay_unspliced: get(&self.relay_unspliced),
            relay_buffers_exhausted: get(&self.relay_buffers_exhausted),
            udp_listeners: get(&self.udp_listeners),
            flows_active: get(&self.flows_active),
            flows_created: get(&self.flows_created),
            flows_expired: get(&self.flows_expired),
            flows_evicted: get(&self.flows_evicted),
            flows_moved: get(&self.flows_moved),
            flows_failed: get(&self.flows_failed),
            udp_datagrams_client_to_backend: get(&self.udp_datagrams_client_to_backend),
            udp_bytes_client_to_backend: get(&self.udp_bytes_client_to_backend),
            udp_datagrams_backend_to_client: get(&self.udp_datagrams_backend_to_client),
            udp_sends: get(&self.udp_sends),
            udp_bytes_backend_to_client: get(&self.udp_bytes_backend_to_client),
            udp_drops_truncated: get(&self.udp_drops_truncated),
            udp_drops_no_backend: get(&self.udp_drops_no_backend),
            udp_drops_send: get(&self.udp_drops_send),
            udp_drops_source_range: get(&self.udp_drops_source_range),
            udp_drops_not_a_vip: get(&self.udp_drops_not_a_vip),
            udp_recv_rearms: get(&self.udp_recv_rearms),
            tcp_refused_source_range: get(&self.tcp_refused_source_range),
            tcp_refused_not_a_vip: get(&self.tcp_refused_not_a_vip),
            backend_load: get(&self.backend_load),
            sctp_listeners: get(&self.sctp_listeners),
            sctp_active: get(&self.sctp_active),
            sctp_accepted: get(&self.sctp_accepted),
            sctp_messages_client_to_backend: get(&self.sctp_messages_client_to_backend),
            sctp_messages_backend_to_client: get(&self.sctp_messages_backend_to_client),
            sctp_aborts: get(&self.sctp_aborts),
            sctp_too_large: get(&self.sctp_too_large),
            local_no_source_port: get(&self.local_no_source_port),
            local_no_descriptors: get(&self.local_no_descriptors),
            local_no_memory: get(&self.local_no_memory),
            local_transparent_failed: get(&self.local_transparent_failed),
            budget_refusals: get(&self.budget_refusals),
            descriptors: get(&self.descriptors),
            descriptor_budget: get(&self.descriptor_budget),
            ring_completion_entries: get(&self.ring_completion_entries),
            ring_cq_overflowed: get(&self.ring_cq_overflowed),
            ring_cq_dropped: get(&self.ring_cq_dropped),
            ring_submit_retries: get(&self.ring_submit_retries),
            ring_failed: get(&self.ring_failed),
        }
    }
}

/// A point-in-time copy of one worker's counters (serialised as-is by the admin `/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkerStats {
    /// Client connections accepted (including those then refused for lack of a backend).
    pub accepted: u64,
    /// Client connections currently held (connecting, relaying or closing).
    pub active: u64,
    /// Backend connect attempts that failed (refused, unreachable, timed out).
    pub connect_failures: u64,
    /// Connect attempts made on another backend after a failure.
    pub retries: u64,
    /// Backend connects made again to the same backend because the source port the worker chose
    /// made a 4-tuple already in use (see `SourcePortMode::Worker`): neither a failure nor a
    /// shortage.
    pub source_port_collisions: u64,
    /// Client connections reset because no eligible backend was left.
    pub no_backend: u64,
    /// Connections ended by a reset (propagated, no backend, connect exhausted, drained).
    pub resets: u64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: u64,
    /// Connections closed because their VIP or backend was removed and the drain timeout passed.
    pub drain_closes: u64,
    /// Connections (TCP) past their backend's removal or readiness loss, waiting for the drain
    /// timeout or their own end (a gauge).
    pub draining: u64,
    /// Backend events (for outlier detection) dropped because the buffer or channel was full.
    pub backend_events_dropped: u64,
    /// Bytes written to backends.
    pub bytes_client_to_backend: u64,
    /// Bytes written to clients.
    pub bytes_backend_to_client: u64,
    /// Listening sockets currently open.
    pub listeners: u64,
    /// Listener bind attempts that failed (retried at every housekeeping tick).
    pub bind_failures: u64,
    /// Copy-relay buffers currently held by connections (lent by the buffer ring or taken from the
    /// fallback pool): only directions with received bytes not yet sent hold one.
    pub buffers_in_use: u64,
    /// Pipes currently taken from the worker's pool.
    pub pipes_in_use: u64,
    /// Pipes kept open in the pool for reuse (two fds each).
    pub pipes_idle: u64,
    /// Relay directions the adaptive relay moved from copy to splice (they proved bulk).
    pub relay_spliced: u64,
    /// Relay directions the adaptive relay moved back from splice to copy (they went quiet or
    /// small), giving their pipe back.
    pub relay_unspliced: u64,
    /// Copy-relay receives that found the worker's buffer ring empty and were repeated into a
    /// buffer of the fallback pool (the ring is too small for the traffic when this grows fast).
    pub relay_buffers_exhausted: u64,
    /// UDP VIP sockets currently open (one per worker and UDP key).
    pub udp_listeners: u64,
    /// UDP flows currently in the flow tables.
    pub flows_active: u64,
    /// UDP flows created (first datagram of a client, or a flow moved to a new backend).
    pub flows_created: u64,
    /// UDP flows ended by their idle timeout (unreplied or replied).
    pub flows_expired: u64,
    /// UDP flows evicted (least recently used) because the table was full.
    pub flows_evicted: u64,
    /// UDP flows ended because their backend was no longer eligible (a new flow replaces each).
    pub flows_moved: u64,
    /// UDP flows ended by an error on their upstream socket (e.g. ICMP port unreachable).
    pub flows_failed: u64,
    /// Datagrams sent to backends.
    pub udp_datagrams_client_to_backend: u64,
    /// Payload bytes sent to backends.
    pub udp_bytes_client_to_backend: u64,
    /// Datagrams sent to clients.
    pub udp_datagrams_backend_to_client: u64,
    /// UDP sends that completed, either way: datagrams forwarded / sends is how many datagrams one
    /// grouped (GSO) send carried on average.
    pub udp_sends: u64,
    /// Payload bytes sent to clients.
    pub udp_bytes_backend_to_client: u64,
    /// Datagrams dropped because they did not fit a receive buffer (cannot happen below 65 527 bytes).
    pub udp_drops_truncated: u64,
    /// Client datagrams dropped: no eligible backend, source not allowed, or no upstream socket.
    pub udp_drops_no_backend: u64,
    /// Datagrams dropped because a send failed (socket buffer full, or an error).
    pub udp_drops_send: u64,
    /// Client datagrams dropped because the client is outside the Service's `loadBalancerSourceRanges`.
    pub udp_drops_source_range: u64,
    /// Client datagrams dropped on a wildcard UDP socket because the address they were sent to is no
    /// VIP of that port.
    pub udp_drops_not_a_vip: u64,
    /// UDP receives re-armed after the kernel ended them (no free buffer, single-shot mode, errors).
    pub udp_recv_rearms: u64,
    /// TCP clients reset at accept because they are outside the Service's `loadBalancerSourceRanges`
    /// (no backend was contacted; also counted in `resets`).
    pub tcp_refused_source_range: u64,
    /// TCP clients reset at accept on a wildcard listener because the address they connected to
    /// is no VIP of that port (also counted in `resets`).
    pub tcp_refused_not_a_vip: u64,
    /// TCP connections (from their backend connect on) and UDP flows this worker currently counts in
    /// its least-connection load table; 0 when none is open.
    pub backend_load: u64,
    /// SCTP listening sockets currently open (one per worker and SCTP key).
    pub sctp_listeners: u64,
    /// SCTP client associations currently held.
    pub sctp_active: u64,
    /// SCTP client associations accepted (including those then refused).
    pub sctp_accepted: u64,
    /// SCTP messages relayed to backends.
    pub sctp_messages_client_to_backend: u64,
    /// SCTP messages relayed to clients.
    pub sctp_messages_backend_to_client: u64,
    /// SCTP associations ended by an abort (propagated, refused, no backend, relay error).
    pub sctp_aborts: u64,
    /// SCTP messages larger than the relay buffer (their association was aborted).
    pub sctp_too_large: u64,
    /// Operations that failed because no source port was free towards their destination
    /// (`EADDRNOTAVAIL`): the load balancer's trouble, never counted against a backend.
    pub local_no_source_port: u64,
    /// Operations (accepts, backend and upstream sockets, pipes) that failed for lack of file
    /// descriptors (`EMFILE`, `ENFILE`); never counted against a backend.
    pub local_no_descriptors: u64,
    /// Operations that failed for lack of kernel memory or buffers (`ENOMEM`, `ENOBUFS`); never
    /// counted against a backend.
    pub local_no_memory: u64,
    /// Backend sockets of transparent entries that could not be bound to the client's address
    /// (`IP_TRANSPARENT` refused for want of `CAP_NET_ADMIN`/`CAP_NET_RAW`, or the client's
    /// address unknown): the TCP client was reset, the UDP datagram dropped. The host's
    /// configuration, never counted against a backend.
    pub local_transparent_failed: u64,
    /// Client connections reset, UDP datagrams of new flows dropped and listeners left unbound
    /// because this worker's descriptor budget was reached (see `descriptor_budget`).
    pub budget_refusals: u64,
    /// Descriptors this worker holds now (listeners, client and backend sockets, pipes, UDP and SCTP
    /// sockets), as it accounts them against its budget (a gauge).
    pub descriptors: u64,
    /// The descriptors this worker may hold: its share of the process's `RLIMIT_NOFILE` after the
    /// control thread's reserve.
    pub descriptor_budget: u64,
    /// Completion-queue entries of this worker's ring (sized for what can be in flight).
    pub ring_completion_entries: u64,
    /// Submissions that found the kernel holding completions in its overflow list (the queue was
    /// full; none were lost).
    pub ring_cq_overflowed: u64,
    /// Completions the kernel dropped (its own overflow counter): should stay 0.
    pub ring_cq_dropped: u64,
    /// Submissions the kernel refused for the moment (`EBUSY`, `EAGAIN`) and that were retried.
    pub ring_submit_retries: u64,
    /// 1 once this worker's ring failed for good: the worker shut its sockets down, leaked what
    /// the kernel might still use, and stopped.
    pub ring_failed: u64,
}

/// Counters of every worker, index = worker number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub workers: Vec<WorkerStats>,
}

impl EngineStats {
    /// The sum over all workers.
    pub fn total(&self) -> WorkerStats {
        self.workers.iter().fold(WorkerStats::default(), |a, w| WorkerStats {
            accepted: a.accepted + w.accepted,
            active: a.active + w.active,
            connect_failures: a.connect_failures + w.connect_failures,
            retries: a.retries + w.retries,
            source_port_collisions: a.source_port_collisions + w.source_port_collisions,
            no_backend: a.no_backend + w.no_backend,
            resets: a.resets + w.resets,
            idle_timeouts: a.idle_timeouts + w.idle_timeouts,
            drain_closes: a.drain_closes + w.drain_closes,
            draining: a.draining + w.draining,
            backend_events_dropped: a.backend_events_dropped + w.backend_events_dropped,
            bytes_client_to_backend: a.bytes_client_to_backend + w.bytes_client_to_backend,
            bytes_backend_to_client: a.bytes_backend_to_client + w.bytes_backend_to_client,
            listeners: a.listeners + w.listeners,
            bind_failures: a.bind_failures + w.bind_failures,
            buffers_in_use: a.buffers_in_use + w.buffers_in_use,
            pipes_in_use: a.pipes_in_use + w.pipes_in_use,
            pipes_idle: a.pipes_idle + w.pipes_idle,
            relay_spliced: a.relay_spliced + w.relay_spliced,
            relay_unspliced: a.relay_unspliced + w.relay_unspliced,
            relay_buffers_exhausted: a.relay_buffers_exhausted + w.relay_buffers_exhausted,
            udp_listeners: a.udp_listeners + w.udp_listeners,
            flows_active: a.flows_active + w.flows_active,
            flows_created: a.flows_created + w.flows_created,
            flows_expired: a.flows_expired + w.flows_expired,
            flows_evicted: a.flows_evicted + w.flows_evicted,
            flows_moved: a.flows_moved + w.flows_moved,
            flows_failed: a.flows_failed + w.flows_failed,
            udp_datagrams_client_to_backend: a.udp_datagrams_client_to_backend
                + w.udp_datagrams_client_to_backend,
            udp_bytes_client_to_backend: a.udp_bytes_client_to_backend + w.udp_bytes_client_to_backend,
            udp_datagrams_backend_to_client: a.udp_datagrams_backend_to_client
                + w.udp_datagrams_backend_to_client,
            udp_sends: a.udp_sends + w.udp_sends,
            udp_bytes_backend_to_client: a.udp_bytes_backend_to_client + w.udp_bytes_backend_to_client,
            udp_drops_truncated: a.udp_drops_truncated + w.udp_drops_truncated,
            udp_drops_no_backend: a.udp_drops_no_backend + w.udp_drops_no_backend,
            udp_drops_send: a.udp_drops_send + w.udp_drops_send,
            udp_drops_source_range: a.udp_drops_source_range + w.udp_drops_source_range,
            udp_drops_not_a_vip: a.udp_drops_not_a_vip + w.udp_drops_not_a_vip,
            udp_recv_rearms: a.udp_recv_rearms + w.udp_recv_rearms,
            tcp_refused_source_range: a.tcp_refused_source_range + w.tcp_refused_source_range,
            tcp_refused_not_a_vip: a.tcp_refused_not_a_vip + w.tcp_refused_not_a_vip,
            backend_load: a.backend_load + w.backend_load,
            sctp_listeners: a.sctp_listeners + w.sctp_listeners,
            sctp_active: a.sctp_active + w.sctp_active,
            sctp_accepted: a.sctp_accepted + w.sctp_accepted,
            sctp_messages_client_to_backend: a.sctp_messages_client_to_backend
                + w.sctp_messages_client_to_backend,
            sctp_messages_backend_to_client: a.sctp_messages_backend_to_client
                + w.sctp_messages_backend_to_client,
            sctp_aborts: a.sctp_aborts + w.sctp_aborts,
            sctp_too_large: a.sctp_too_large + w.sctp_too_large,
            local_no_source_port: a.local_no_source_port + w.local_no_source_port,
            local_no_descriptors: a.local_no_descriptors + w.local_no_descriptors,
            local_no_memory: a.local_no_memory + w.local_no_memory,
            local_transparent_failed: a.local_transparent_failed + w.local_transparent_failed,
            budget_refusals: a.budget_refusals + w.budget_refusals,
            descriptors: a.descriptors + w.descriptors,
            descriptor_budget: a.descriptor_budget + w.descriptor_budget,
            ring_completion_entries: a.ring_completion_entries + w.ring_completion_entries,
            ring_cq_overflowed: a.ring_cq_overflowed + w.ring_cq_overflowed,
            ring_cq_dropped: a.ring_cq_dropped + w.ring_cq_dropped,
            ring_submit_retries: a.ring_submit_retries + w.ring_submit_retries,
            ring_failed: a.ring_failed + w.ring_failed,
        })
    }
}
