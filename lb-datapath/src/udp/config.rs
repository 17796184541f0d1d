//! UDP settings of the engine: flow table bound and receive buffers. Plain data; the worker reads it
//! once at start. Flow timeouts and what happens to flows whose backend left are per Service
//! policy, in the snapshot (`lb_core::EntryPolicy`).

/// 16 MiB: about 20 000 small datagrams, 40 ms of 500k datagrams/s. With the kernel default
/// (208 KiB) bursts that arrive while the worker is not running were dropped (0.4-2.8 % of
/// udp-stream); 4 MiB fixed the unpaced blast but still lost 1.72 % (median of 5) of 500k/s
/// offered in the VIP sockets' queues, 16 MiB 0.15 % (`bench/RESULTS.md`, UDP overload). Memory is
/// only taken while datagrams wait, and `net.ipv4.udp_mem` bounds all UDP sockets together.
const VIP_RCVBUF_DEFAULT: usize = 16 << 20;

/// UDP settings of the engine (per worker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// Flows one worker tracks at most; the least recently used is evicted beyond. Each flow's
    /// upstream socket takes an ephemeral port, so all workers together hold at most about
    /// `net.ipv4.ip_local_port_range` (28 232 by default) flows per backend-facing source address;
    /// beyond that, new flows fail (`udp_drops_no_backend`) until others end.
    pub max_flows_per_worker: usize,
    /// Receive buffers per worker (rounded up to a power of two); each holds a 65 527-byte datagram.
    /// Memory is mapped lazily, so only buffers the kernel ever filled cost resident memory.
    pub recv_buffers: u16,
    /// Use multishot `recvmsg` where the kernel supports it (6.0+); `false` forces the re-armed
    /// single-shot receive (useful to exercise that path on a new kernel).
    pub multishot_recv: bool,
    /// Receive buffer of each VIP socket in bytes, as `SO_RCVBUF` reports it (0: the kernel default,
    /// `net.core.rmem_default`). Set with `SO_RCVBUFFORCE` (root or `CAP_NET_ADMIN`), else capped at
    /// `net.core.rmem_max`. A 64-byte datagram takes about 1 KiB of it.
    pub vip_receive_buffer: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            max_flows_per_worker: 65_536,
            recv_buffers: 128,
            multishot_recv: true,
            vip_receive_buffer: VIP_RCVBUF_DEFAULT,
        }
    }
}
