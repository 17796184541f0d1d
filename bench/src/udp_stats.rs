//! The tiny UDP stats protocol between `udp-stream` and `serve udp-sink`: the sender asks the sink how
//! many datagrams it has counted, before and after blasting, and reports the difference as received.
//!
//! A query is `QUERY_PREFIX` + an 8-byte nonce; the answer is `ANSWER_PREFIX` + the same nonce + the
//! datagram and byte counts (u64 little-endian). Queries are never counted as received datagrams.
//! It goes to the same address as the load, so it works through a UDP proxy with a single backend.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

pub const QUERY_PREFIX: &[u8; 19] = b"RINGLB-BENCH-STATS?";
pub const ANSWER_PREFIX: &[u8; 19] = b"RINGLB-BENCH-STATS=";
pub const QUERY_LEN: usize = QUERY_PREFIX.len() + 8;
pub const ANSWER_LEN: usize = ANSWER_PREFIX.len() + 8 + 16;

/// The sink's counters at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkCounts {
    pub datagrams: u64,
    pub bytes: u64,
}

pub fn is_query(datagram: &[u8]) -> bool {
    datagram.len() == QUERY_LEN && datagram.starts_with(QUERY_PREFIX)
}

/// The answer to `query` (which must satisfy `is_query`).
pub fn answer(query: &[u8], counts: SinkCounts) -> [u8; ANSWER_LEN] {
    let mut out = [0u8; ANSWER_LEN];
    out[..ANSWER_PREFIX.len()].copy_from_slice(ANSWER_PREFIX);
    out[ANSWER_PREFIX.len()..ANSWER_PREFIX.len() + 8].copy_from_slice(&query[QUERY_PREFIX.len()..QUERY_LEN]);
    out[ANSWER_LEN - 16..ANSWER_LEN - 8].copy_from_slice(&counts.datagrams.to_le_bytes());
    out[ANSWER_LEN - 8..].copy_from_slice(&counts.bytes.to_le_bytes());
    out
}

fn parse_answer(datagram: &[u8], nonce: u64) -> Option<SinkCounts> {
    if datagram.len() != ANSWER_LEN || !datagram.starts_with(ANSWER_PREFIX) {
        return None;
    }
    let word = |at: usize| datagram.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    if word(ANSWER_PREFIX.len())? != nonce {
        return None;
    }
    Some(SinkCounts { datagrams: word(ANSWER_LEN - 16)?, bytes: word(ANSWER_LEN - 8)? })
}

/// Asks the sink at `target` for its counters; retries a few times, each attempt bounded.
pub fn query(target: SocketAddr, nonce: u64) -> io::Result<SinkCounts> {
    let bind = crate::sockets::any_port_like(target);
    let socket = UdpSocket::bind(bind)?;
    socket.connect(target)?;
    let mut request = [0u8; QUERY_LEN];
    request[..QUERY_PREFIX.len()].copy_from_slice(QUERY_PREFIX);
    request[QUERY_PREFIX.len()..].copy_from_slice(&nonce.to_le_bytes());
    let mut buffer = [0u8; 256];
    for _attempt in 0..5 {
        socket.send(&request)?;
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            match socket.recv(&mut buffer) {
                Ok(count) => {
                    if let Some(counts) = parse_answer(&buffer[..count], nonce) {
                        return Ok(counts);
                    }
                }
                Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("no stats answer from {target}")))
}

/// Queries until two answers 20 ms apart agree (datagrams still queued at the sink have been counted),
/// for at most one second; returns the last answer.
pub fn settled_query(target: SocketAddr, nonce: &mut u64) -> io::Result<SinkCounts> {
    let deadline = Instant::now() + Duration::from_secs(1);
    *nonce += 1;
    let mut last = query(target, *nonce)?;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        *nonce += 1;
        let next = query(target, *nonce)?;
        if next == last {
            break;
        }
        last = next;
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_round_trips_counts_and_nonce() {
        let mut request = [0u8; QUERY_LEN];
        request[..QUERY_PREFIX.len()].copy_from_slice(QUERY_PREFIX);
        request[QUERY_PREFIX.len()..].copy_from_slice(&42u64.to_le_bytes());
        assert!(is_query(&request));
        let counts = SinkCounts { datagrams: 7, bytes: 448 };
        let reply = answer(&request, counts);
        assert_eq!(parse_answer(&reply, 42), Some(counts));
        assert_eq!(parse_answer(&reply, 43), None, "a stale nonce must not be taken as the answer");
    }

    #[test]
    fn ordinary_payloads_are_not_queries() {
        assert!(!is_query(&[b'x'; QUERY_LEN]));
        assert!(!is_query(QUERY_PREFIX));
    }
}
